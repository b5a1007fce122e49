"""``fastpull load`` of broken and hostile archives: one line, exit 6, the store untouched."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import index_entries, one_line
from tests.support.images import Image, make_image, make_layer

NAME = "registry.example/app/hostile:1"

Member = tuple[str, bytes]


def _image() -> Image:
    return make_image(
        [
            make_layer({"etc/os-release": b"ID=hostile\n"}, seed=400),
            make_layer({"x": b"x\n"}, seed=401),
        ]
    )


def oci_members(image: Image) -> list[Member]:
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.manifest_digest,
                "size": len(image.manifest_bytes),
                "annotations": {"io.containerd.image.name": NAME},
            }
        ],
    }
    members = [(f"blobs/sha256/{d.split(':')[1]}", data) for d, data in image.blobs.items()]
    members.append((f"blobs/sha256/{image.manifest_digest.split(':')[1]}", image.manifest_bytes))
    members += [
        ("index.json", json.dumps(index).encode()),
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
    ]
    return members


def docker_members(image: Image, layer_paths: list[str] | None = None) -> list[Member]:
    """A docker-archive as podman and skopeo write it: uncompressed layers by DiffID."""
    import gzip

    members = [("config.json", image.config_bytes)]
    paths = layer_paths or [f"{layer.diff_id.split(':')[1]}.tar" for layer in image.layers]
    for path, layer in zip(paths, image.layers, strict=True):
        members.append((path, gzip.decompress(layer.data)))
    items = [{"Config": "config.json", "RepoTags": [NAME], "Layers": paths}]
    members.append(("manifest.json", json.dumps(items).encode()))
    return members


def tar_of(members: list[Member], extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return out.getvalue()


def _load(cli: Any, tmp_path: Path, data: bytes) -> Any:
    archive = tmp_path / "in.tar"
    archive.write_bytes(data)
    return cli("load", "-i", str(archive))


def _assert_refused(result: Any, store: Path, *words: str) -> None:
    one_line(result.err)
    assert result.code == 6, result.err
    for word in words:
        assert word in result.err, result.err
    assert index_entries(store) == []
    assert [p for p in (store / "blobs").rglob("*") if p.is_file()] == []
    assert list((store / "ingest").iterdir()) == []


def test_a_well_formed_archive_loads(cli: Any, tmp_path: Path, docker_config: Any) -> None:
    # The baseline the hostile variants below differ from.
    image = _image()
    for members in (oci_members(image), docker_members(image)):
        result = _load(cli, tmp_path, tar_of(members))
        assert result.code == 0, result.err
        assert result.lines == ["Loaded image: registry.example/app/hostile:1"]
    (entry,) = index_entries(docker_config.store)
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == NAME


def _symlink(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Callable[..., None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        tar.addfile(info)

    return add


def _device(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("dev/null")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


HOSTILE: dict[str, tuple[Callable[[Image], bytes], tuple[str, ...]]] = {
    "dot-dot name": (
        lambda im: tar_of([*oci_members(im), ("../evil", b"x")]),
        ("outside the archive",),
    ),
    "absolute name": (
        lambda im: tar_of([*oci_members(im), ("/etc/evil", b"x")]),
        ("not a relative path",),
    ),
    "symlink out": (
        lambda im: tar_of(oci_members(im), _symlink("link", "/etc/passwd")),
        ("link",),
    ),
    "symlink climbing": (
        lambda im: tar_of(oci_members(im), _symlink("a/link", "../../etc/passwd")),
        ("outside the archive",),
    ),
    "hard link out": (
        lambda im: tar_of(oci_members(im), _symlink("link", "../x", tarfile.LNKTYPE)),
        ("outside the archive",),
    ),
    "device": (lambda im: tar_of(oci_members(im), _device), ("character device",)),
    "missing layer": (
        lambda im: tar_of(
            [m for m in oci_members(im) if not m[0].endswith(im.layers[1].digest.split(":")[1])]
        ),
        ("missing from the archive",),
    ),
    "wrong blob": (
        lambda im: tar_of(
            [
                (n, b"not the layer" if n.endswith(im.layers[0].digest.split(":")[1]) else d)
                for n, d in oci_members(im)
            ]
        ),
        ("does not match its digest",),
    ),
    "oversize index.json": (
        lambda im: tar_of(
            [m for m in oci_members(im) if m[0] != "index.json"]
            + [("index.json", b" " * (9 << 20))]
        ),
        ("more than",),
    ),
    "layer link out of a docker archive": (
        lambda im: tar_of(docker_members(im, ["../../etc/passwd", "b.tar"])),
        ("outside the archive",),
    ),
    "layer not matching its DiffID": (
        lambda im: tar_of(
            [
                (n, b"tampered" + d if n == "b.tar" else d)
                for n, d in docker_members(im, ["a.tar", "b.tar"])
            ]
        ),
        ("does not match its DiffID",),
    ),
    "config listing another number of layers": (
        lambda im: tar_of(
            [m for m in docker_members(im, ["a.tar", "b.tar"]) if m[0] != "manifest.json"]
            + [
                (
                    "manifest.json",
                    json.dumps(
                        [{"Config": "config.json", "RepoTags": [NAME], "Layers": ["a.tar"]}]
                    ).encode(),
                )
            ]
        ),
        ("1 layers",),
    ),
    "not an archive of images": (lambda im: tar_of([("hello.txt", b"hi")]), ("not an image",)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused(
    case: str, cli: Any, tmp_path: Path, docker_config: Any
) -> None:
    build, words = HOSTILE[case]
    result = _load(cli, tmp_path, build(_image()))
    _assert_refused(result, docker_config.store, *words)


def test_truncated_and_overlong_members_are_refused(
    cli: Any, tmp_path: Path, docker_config: Any
) -> None:
    data = tar_of(oci_members(_image()))
    result = _load(cli, tmp_path, data[: len(data) // 2 + 100])
    _assert_refused(result, docker_config.store, "truncated")

    # A member whose data runs past the size its header states: what follows is no header.
    first = tarfile.TarInfo("extra.bin")
    first.size = 10
    header = first.tobuf(tarfile.PAX_FORMAT)
    overlong = header + b"A" * 1024 + data
    result = _load(cli, tmp_path, overlong)
    _assert_refused(result, docker_config.store, "invalid tar header")


def test_links_inside_the_archive_are_followed(
    cli: Any, tmp_path: Path, docker_config: Any
) -> None:
    # docker save before 25 writes a layer repeated in an image once, and links the rest
    # to it (`<id>/layer.tar -> ../<other id>/layer.tar`); such a link stays inside.
    layer = make_layer({"same": b"same\n"}, seed=402)
    image = make_image([layer, layer])
    members = docker_members(image, ["one/layer.tar", "two/layer.tar"])
    members = [m for m in members if m[0] != "two/layer.tar"]
    data = tar_of(members, _symlink("two/layer.tar", "../one/layer.tar"))
    result = _load(cli, tmp_path, data)
    assert result.code == 0, result.err
    assert cli("verify").code == 0
    (entry,) = index_entries(docker_config.store)
    manifest = json.loads((docker_config.store / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    assert [la["digest"] for la in manifest["layers"]] == [layer.diff_id, layer.diff_id]
