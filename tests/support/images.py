"""Build synthetic OCI / Docker images and push them over the distribution API.

Everything here is independent of fastpull: layers are real tar archives (gzip or plain), configs
and manifests are built by hand, and :class:`Pusher` speaks HTTP with the standard library. Small
layers live in memory; pass ``workdir`` to :func:`make_layer` to stream a large one to disk and
upload it in chunks.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlencode, urlsplit

from tests.support.netutil import HARNESS_USER_AGENT, connect, url_opener

MiB = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

# Fixed so identical inputs always give identical digests.
DEFAULT_CREATED = "2024-01-01T00:00:00Z"

ImageFormat = Literal["oci", "docker"]
Compression = Literal["gzip", "none"]

_LAYER_MEDIA_TYPES: dict[tuple[ImageFormat, Compression], str] = {
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "none"): OCI_LAYER_TAR,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "none"): DOCKER_LAYER_TAR,
}

_RANDOM_BLOCK = MiB


def sha256_digest(data: bytes) -> str:
    """Return ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Blob:
    """Content-addressed bytes, held in memory (``content``) or in a file (``path``)."""

    digest: str
    size: int
    media_type: str
    content: bytes | None = None
    path: Path | None = None

    @property
    def data(self) -> bytes:
        """The whole blob; reads the file for on-disk blobs, so avoid it for huge ones."""
        if self.content is not None:
            return self.content
        assert self.path is not None
        return self.path.read_bytes()

    def iter_chunks(self, chunk_size: int) -> Iterator[bytes]:
        """Yield the blob in pieces of at most ``chunk_size`` bytes without loading it all."""
        if self.content is not None:
            for start in range(0, len(self.content), chunk_size):
                yield self.content[start : start + chunk_size]
            return
        assert self.path is not None
        with self.path.open("rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def descriptor(self) -> dict[str, Any]:
        """An OCI descriptor (``mediaType``, ``digest``, ``size``) for this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, kw_only=True)
class Layer(Blob):
    """A layer blob plus ``diff_id``, the digest of its uncompressed tar."""

    diff_id: str


@dataclass(frozen=True)
class Symlink:
    """A symbolic-link entry for :func:`make_layer` (the target is stored verbatim)."""

    target: str


@dataclass(frozen=True)
class Hardlink:
    """A hard-link entry for :func:`make_layer` (the target is stored verbatim)."""

    target: str


FileSpec = Mapping[str, bytes | Symlink | Hardlink]


class _RandomReader:
    """File-like source of ``size`` deterministic pseudo-random bytes.

    Bytes are generated in fixed blocks so the output does not depend on how the caller
    sizes its reads.
    """

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size
        self._block = b""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._left + len(self._block) - self._pos
        pieces = []
        while n > 0:
            if self._pos == len(self._block):
                if self._left == 0:
                    break
                size = min(_RANDOM_BLOCK, self._left)
                self._block, self._pos = self._rng.randbytes(size), 0
                self._left -= size
            # Slicing from an offset (not re-slicing the buffer) keeps big layers linear-time.
            piece = self._block[self._pos : self._pos + n]
            self._pos += len(piece)
            n -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)


class _LayerSink:
    """Receives the tar stream, hashes it (diff_id), then compresses, hashes and stores it."""

    def __init__(self, out: BinaryIO, compression: Compression, compresslevel: int) -> None:
        self._out = out
        self._diff = hashlib.sha256()
        self._digest = hashlib.sha256()
        self.size = 0
        # wbits=31 writes a gzip wrapper with mtime 0 and no file name: stable digests.
        self._zlib = (
            zlib.compressobj(compresslevel, zlib.DEFLATED, 31) if compression == "gzip" else None
        )

    def write(self, data: bytes) -> int:
        self._diff.update(data)
        self._emit(self._zlib.compress(data) if self._zlib else data)
        return len(data)

    def finish(self) -> tuple[str, str]:
        """Flush the compressor; return ``(digest, diff_id)``."""
        if self._zlib is not None:
            self._emit(self._zlib.flush())
        return "sha256:" + self._digest.hexdigest(), "sha256:" + self._diff.hexdigest()

    def _emit(self, data: bytes) -> None:
        if data:
            self._digest.update(data)
            self._out.write(data)
            self.size += len(data)


def _tar_info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_tar(sink: _LayerSink, content: FileSpec | int, seed: int) -> None:
    # Stream mode ("w|") only ever calls write(), so the sink needs no seek/tell.
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if isinstance(content, int):
            info = _tar_info(f"random-{seed}.bin", tarfile.REGTYPE, content)
            tar.addfile(info, _RandomReader(seed, content))
            return
        seen: set[str] = set()
        for name, value in content.items():
            # Add missing parent directories (as real builders do), but only along plain
            # components so deliberately hostile names like "../x" stay exactly as given.
            parts = name.rstrip("/").split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                if parts[depth - 1] in ("", ".", ".."):
                    break
                parent = "/".join(parts[:depth]) + "/"
                if parent not in seen and parent not in content:
                    seen.add(parent)
                    tar.addfile(_tar_info(parent, tarfile.DIRTYPE))
            if isinstance(value, Symlink):
                info = _tar_info(name, tarfile.SYMTYPE)
                info.linkname = value.target
                tar.addfile(info)
            elif isinstance(value, Hardlink):
                info = _tar_info(name, tarfile.LNKTYPE)
                info.linkname = value.target
                tar.addfile(info)
            elif name.endswith("/"):
                tar.addfile(_tar_info(name, tarfile.DIRTYPE))
            else:
                tar.addfile(_tar_info(name, tarfile.REGTYPE, len(value)), io.BytesIO(value))
            seen.add(name)


def make_layer(
    content: FileSpec | int,
    *,
    compression: Compression = "gzip",
    format: ImageFormat = "oci",
    seed: int = 0,
    compresslevel: int = 6,
    workdir: str | Path | None = None,
) -> Layer:
    """Build a real tar layer.

    ``content`` is either a mapping of archive path to file bytes (or :class:`Symlink` /
    :class:`Hardlink`; a path ending in ``/`` makes an empty directory) or an ``int`` size, which
    makes one file ``random-<seed>.bin`` of that many pseudo-random bytes derived from ``seed``.
    Parent directories are added automatically. With ``workdir`` the compressed layer is
    streamed to a new file there instead of memory, which keeps 100+ MiB layers cheap; the
    file is left for whoever owns ``workdir`` to clean up.
    """
    media_type = _LAYER_MEDIA_TYPES[(format, compression)]
    if workdir is None:
        buffer = io.BytesIO()
        sink = _LayerSink(buffer, compression, compresslevel)
        _write_tar(sink, content, seed)
        digest, diff_id = sink.finish()
        return Layer(
            digest=digest,
            size=sink.size,
            media_type=media_type,
            diff_id=diff_id,
            content=buffer.getvalue(),
        )
    fd, name = tempfile.mkstemp(prefix="layer-", suffix=".blob", dir=workdir)
    with os.fdopen(fd, "wb") as out:
        sink = _LayerSink(out, compression, compresslevel)
        _write_tar(sink, content, seed)
        digest, diff_id = sink.finish()
    return Layer(
        digest=digest, size=sink.size, media_type=media_type, diff_id=diff_id, path=Path(name)
    )


def raw_blob(data: bytes, media_type: str = OCI_LAYER_GZIP) -> Layer:
    """Wrap arbitrary bytes (an empty blob, junk) as a layer; ``diff_id`` is their own digest.

    Such layers are stored by registries but cannot be unpacked; use them for store-level tests.
    """
    digest = sha256_digest(data)
    return Layer(digest=digest, size=len(data), media_type=media_type, diff_id=digest, content=data)


def _json_blob(document: Mapping[str, Any], media_type: str) -> Blob:
    data = json.dumps(document, separators=(",", ":")).encode()
    return Blob(digest=sha256_digest(data), size=len(data), media_type=media_type, content=data)


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest, config and layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]
    platform: dict[str, str]

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.data

    @property
    def manifest_digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def config_bytes(self) -> bytes:
        return self.config.data

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def blobs(self) -> dict[str, bytes]:
        """Digest → bytes of the config and every layer (reads on-disk layers)."""
        return {blob.digest: blob.data for blob in self.referenced_blobs()}

    def referenced_blobs(self) -> list[Blob]:
        """Config and layers, each digest once, in manifest order."""
        unique: dict[str, Blob] = {self.config.digest: self.config}
        for layer in self.layers:
            unique.setdefault(layer.digest, layer)
        return list(unique.values())

    def descriptor(self) -> dict[str, Any]:
        """The descriptor of this manifest as it appears in an index, with ``platform``."""
        return {**self.manifest.descriptor(), "platform": dict(self.platform)}


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list over several :class:`Image` objects."""

    manifest: Blob
    images: tuple[Image, ...]

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.data

    @property
    def manifest_digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type


def make_image(
    layers: Sequence[Layer],
    *,
    os: str = "linux",
    architecture: str = "amd64",
    variant: str | None = None,
    format: ImageFormat = "oci",
    created: str = DEFAULT_CREATED,
) -> Image:
    """Build the config and manifest for ``layers`` (used verbatim, media types included)."""
    platform = {"architecture": architecture, "os": os}
    if variant:
        platform["variant"] = variant
    config_doc = {
        "created": created,
        **platform,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": created, "created_by": f"fastpull test harness: layer {i}"}
            for i in range(len(layers))
        ],
    }
    config = _json_blob(config_doc, OCI_CONFIG if format == "oci" else DOCKER_CONFIG)
    manifest_type = OCI_MANIFEST if format == "oci" else DOCKER_MANIFEST
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
        manifest_type,
    )
    return Image(manifest=manifest, config=config, layers=tuple(layers), platform=platform)


def make_index(images: Sequence[Image], format: ImageFormat = "oci") -> Index:
    """Build an OCI image index or Docker manifest list with each image's platform."""
    media_type = OCI_INDEX if format == "oci" else DOCKER_MANIFEST_LIST
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [image.descriptor() for image in images],
        },
        media_type,
    )
    return Index(manifest=manifest, images=tuple(images))


# ----------------------------------------------------------------------------------------------
# Pushing


class PushError(RuntimeError):
    """A registry or token-server request answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        text = body[:2000].decode("utf-8", "replace")
        super().__init__(f"{method} {url} -> {status}: {text}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Scheme k="v",k2=v2`` into ``("scheme", {k: v})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _target(url: str) -> str:
    """Reduce a URL (or an already relative target) to ``path?query``."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


class Pusher:
    """Pushes blobs and manifests to one registry, answering Basic and Bearer challenges.

    ``token`` sends a fixed bearer token instead of following challenges. One connection is
    kept alive; a ``Pusher`` is not meant to be shared between threads.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ca_path: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        chunk_size: int = 8 * MiB,
        timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.ca_path = ca_path
        self.username = username
        self.password = password
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._static_token = token
        self._basic: str | None = None
        self._bearer: dict[str, str] = {}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        """Close the kept-alive connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- blobs and manifests ---------------------------------------------------------------

    def blob_exists(self, name: str, digest: str) -> bool:
        """HEAD the blob in repository ``name``."""
        resp = self._request("HEAD", f"/v2/{name}/blobs/{digest}", repo=name, expect=(200, 404))
        return resp.status == 200

    def push_blob(self, name: str, blob: Blob) -> bool:
        """Upload ``blob`` unless the registry has it; return whether bytes were sent.

        Blobs up to ``chunk_size`` go in one PUT; bigger ones are streamed as PATCH chunks.
        """
        if self.blob_exists(name, blob.digest):
            return False
        resp = self._request("POST", f"/v2/{name}/blobs/uploads/", repo=name, expect=(202,))
        location = resp.headers["Location"]
        octets = {"Content-Type": "application/octet-stream"}
        if blob.size <= self.chunk_size:
            final_body = blob.data
        else:
            offset = 0
            for chunk in blob.iter_chunks(self.chunk_size):
                resp = self._request(
                    "PATCH",
                    location,
                    repo=name,
                    body=chunk,
                    headers={**octets, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
                    expect=(202,),
                )
                location = resp.headers["Location"]
                offset += len(chunk)
            final_body = b""
        separator = "&" if urlsplit(location).query else "?"
        resp = self._request(
            "PUT",
            location + separator + urlencode({"digest": blob.digest}),
            repo=name,
            body=final_body,
            headers=octets,
            expect=(201,),
        )
        stored = resp.headers.get("Docker-Content-Digest")
        if stored not in (None, blob.digest):
            raise AssertionError(f"registry stored {stored}, expected {blob.digest}")
        return True

    def push_manifest(self, name: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; return the digest the registry reports."""
        resp = self._request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            repo=name,
            body=data,
            headers={"Content-Type": media_type},
            expect=(201,),
        )
        return resp.headers.get("Docker-Content-Digest") or sha256_digest(data)

    def push_image(self, name: str, tag: str | None, image: Image) -> str:
        """Push config, layers and manifest (by digest when ``tag`` is None); return digest."""
        for blob in image.referenced_blobs():
            self.push_blob(name, blob)
        return self.push_manifest(
            name, tag or image.manifest_digest, image.manifest_bytes, image.media_type
        )

    def push_index(self, name: str, tag: str | None, index: Index) -> str:
        """Push every child image by digest, then the index itself; return its digest."""
        for image in index.images:
            self.push_image(name, None, image)
        return self.push_manifest(
            name, tag or index.manifest_digest, index.manifest_bytes, index.media_type
        )

    def delete_manifest(self, name: str, reference: str) -> None:
        """Delete a manifest; a tag is first resolved to its digest, as the API requires."""
        if not reference.startswith("sha256:"):
            resp = self._request(
                "HEAD",
                f"/v2/{name}/manifests/{reference}",
                repo=name,
                headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
                expect=(200,),
            )
            reference = resp.headers["Docker-Content-Digest"]
        self._request("DELETE", f"/v2/{name}/manifests/{reference}", repo=name, expect=(202,))

    def delete_blob(self, name: str, digest: str) -> None:
        """Delete a blob from repository ``name`` (to make manifests point at missing blobs)."""
        self._request("DELETE", f"/v2/{name}/blobs/{digest}", repo=name, expect=(202,))

    def list_tags(self, name: str) -> list[str]:
        """Return every tag of ``name``, following ``Link: rel="next"`` pages."""
        tags: list[str] = []
        target: str | None = f"/v2/{name}/tags/list"
        while target:
            resp = self._request("GET", target, repo=name, expect=(200,))
            tags.extend(json.loads(resp.body).get("tags") or [])
            link = _NEXT_LINK.search(resp.headers.get("Link") or "")
            target = link.group(1) if link else None
        return tags

    # -- HTTP and auth ---------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        repo: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int],
    ) -> _Response:
        target = _target(url)
        resp = self._send(method, target, body, headers, repo)
        if resp.status == 401 and self._authenticate(repo, resp.headers.get("WWW-Authenticate")):
            resp = self._send(method, target, body, headers, repo)
        if resp.status not in expect:
            raise PushError(method, self.base_url + target, resp.status, resp.body)
        return resp

    def _send(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        repo: str,
    ) -> _Response:
        all_headers = {"User-Agent": HARNESS_USER_AGENT, **(headers or {})}
        authorization = self._authorization(repo)
        if authorization:
            all_headers["Authorization"] = authorization
        # Only methods that carry a body get one; http.client then sends Content-Length.
        payload = body if method in ("POST", "PUT", "PATCH") else None
        try:
            return self._exchange(method, target, payload, all_headers)
        except ConnectionError:
            # The server closed the kept-alive connection between requests: reconnect once.
            return self._exchange(method, target, payload, all_headers)

    def _exchange(
        self, method: str, target: str, payload: bytes | None, headers: dict[str, str]
    ) -> _Response:
        if self._conn is None:
            self._conn = connect(self.base_url, ca_path=self.ca_path, timeout=self.timeout)
        try:
            self._conn.request(method, target, body=payload, headers=headers)
            response = self._conn.getresponse()
            return _Response(response.status, response.headers, response.read())
        except BaseException:
            # A half-used connection is useless; the next request starts a fresh one.
            self.close()
            raise

    def _authorization(self, repo: str) -> str | None:
        if self._static_token:
            return f"Bearer {self._static_token}"
        if repo in self._bearer:
            return f"Bearer {self._bearer[repo]}"
        return self._basic

    def _authenticate(self, repo: str, challenge: str | None) -> bool:
        """Answer a 401 challenge; return whether retrying the request makes sense."""
        if self._static_token or not challenge:
            return False
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.username is None:
                return False
            raw = f"{self.username}:{self.password or ''}".encode()
            self._basic = "Basic " + base64.b64encode(raw).decode()
            return True
        if scheme == "bearer" and "realm" in params:
            scopes = params.get("scope", "").split()
            if repo:
                scopes.append(f"repository:{repo}:pull,push")
            self._bearer[repo] = self._fetch_token(
                params["realm"], params.get("service"), list(dict.fromkeys(scopes))
            )
            return True
        return False

    def _fetch_token(self, realm: str, service: str | None, scopes: list[str]) -> str:
        query = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        request = urllib.request.Request(url, headers={"User-Agent": HARNESS_USER_AGENT})
        if self.username is not None:
            raw = f"{self.username}:{self.password or ''}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
        try:
            with url_opener(self.ca_path).open(request, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise PushError("GET", url, exc.code, exc.read()) from None
        try:
            answer = json.loads(body)
            return answer.get("token") or answer["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise PushError("GET", url, 200, body) from None
