"""The distribution API for one registry: ping, authorization, manifests, tags, blob URLs.

The handshake, as Docker does it:

1. ``GET /v2/`` picks the scheme: HTTPS, or for insecure / loopback registries HTTPS
   without verification and then plain HTTP (Docker's ``insecure-registries`` behaviour).
2. A request answered 401 carries a ``WWW-Authenticate`` challenge. ``Bearer`` means: get a
   token from the realm for the scope (anonymously, with Basic credentials, or with an
   OAuth refresh token) and retry; ``Basic`` means: send the credentials and retry.
3. Tokens are cached per (realm, service, scope) until shortly before they expire; a 401
   on a cached token drops it and authenticates once more.

The registry's credentials are only ever attached to URLs on the registry's own origin;
redirects elsewhere go without them (see ``transport.next_hop``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NamedTuple
from urllib.parse import quote, urljoin

import orjson

from fastpull.errors import (
    ConnectionFailed,
    FastpullError,
    ManifestError,
    ProtocolError,
    ResponseTooLarge,
    TLSFailure,
    Unauthorized,
    redact_url,
)
from fastpull.reference import DEFAULT_REGISTRY, endpoint_host, split_registry
from fastpull.registry import auth
from fastpull.registry.manifest import ACCEPT, MAX_MANIFEST_SIZE, check_digest, digest_of
from fastpull.registry.settings import Settings
from fastpull.registry.transport import MAX_SMALL_BODY, Response, Transport, http_error, origin
from fastpull.types import Credentials, Digest

DOCKER_HUB = DEFAULT_REGISTRY
MAX_TAG_PAGES = 10_000


class FetchedManifest(NamedTuple):
    """Manifest bytes as served, already checked against every digest we know of."""

    raw: bytes
    content_type: str | None
    digest: Digest


class RegistryClient:
    """An authenticated conversation with one registry."""

    def __init__(
        self,
        registry: str,
        *,
        settings: Settings,
        credentials: Credentials,
        transport: Transport,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.host = endpoint_host(registry)
        self.settings = settings
        self.credentials = credentials
        self.transport = transport
        self._clock = clock
        self._base: str | None = None
        self._tokens = auth.TokenCache()
        # After the first challenge we know what the registry wants and answer up front.
        self._challenge: auth.Challenge | None = None

    @property
    def base_url(self) -> str:
        """``scheme://host`` of the registry, chosen by the ping on first use."""
        if self._base is None:
            self._base = self._ping()
        return self._base

    def _ping(self) -> str:
        host, _ = split_registry(self.host)
        insecure = self.settings.is_insecure(self.host)
        schemes = ("https", "http") if insecure else ("https",)
        last: FastpullError | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            try:
                response = self.transport.request("GET", url)
            except (TLSFailure, ConnectionFailed) as exc:
                last = exc
                continue
            if response.status == 401:
                self._remember_challenge(response)
            elif response.status >= 400 and response.status != 404:
                raise http_error(response, f"registry {self.host}")
            return f"{scheme}://{self.host}"
        assert last is not None
        if not insecure and isinstance(last, TLSFailure):
            raise TLSFailure(
                f"{last}; if {host} is a registry you trust without TLS, "
                f"pass --insecure-registry {self.host}",
                host=self.host,
            )
        raise last

    def _remember_challenge(self, response: Response) -> auth.Challenge | None:
        challenges = auth.parse_www_authenticate_headers(response.header_all("www-authenticate"))
        for wanted in ("bearer", "basic"):
            for challenge in challenges:
                if challenge.scheme == wanted:
                    self._challenge = challenge
                    return challenge
        return None

    def _cache_key(self, challenge: auth.Challenge, scope: str) -> auth.CacheKey:
        params = challenge.params
        return auth.token_cache_key(params.get("realm", ""), params.get("service", ""), [scope])

    def authorization(self, scope: str) -> dict[str, str]:
        """Headers to send for ``scope`` without asking the registry first (may be empty)."""
        if self.credentials.registry_token:
            return {"Authorization": f"Bearer {self.credentials.registry_token}"}
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            if self.credentials.username:
                return {"Authorization": auth.basic_authorization(self.credentials)}
            return {}
        token = self._tokens.get(self._cache_key(challenge, scope), self._clock())
        return {"Authorization": f"Bearer {token.value}"} if token else {}

    def authenticate(self, response: Response, scope: str) -> dict[str, str]:
        """Answer a 401: fetch a token (or prepare Basic) and return the new headers."""
        challenge = self._remember_challenge(response)
        if challenge is None:
            raise Unauthorized(
                f"unauthorized: {self.host} refused the request without saying how to log in"
            )
        if challenge.scheme == "basic":
            if not self.credentials.username:
                raise Unauthorized(
                    f"unauthorized: authentication required; log in with "
                    f"`fastpull login {self.registry}`"
                )
            return {"Authorization": auth.basic_authorization(self.credentials)}
        key = self._cache_key(challenge, scope)
        self._tokens.invalidate(key)
        # Several scopes (a push that mounts: "repository:a:pull,push repository:b:pull")
        # go as one parameter each, as token.md asks.
        scopes = scope.split()
        offered = challenge.params.get("scope")
        if offered and offered != scope:
            scopes.append(offered)
        request = auth.token_request(
            challenge, scopes=scopes, credentials=self.credentials, registry_url=self.base_url
        )
        reply = self.transport.request(
            request.method, request.url, request.headers, request.body, MAX_SMALL_BODY
        )
        if reply.status in (401, 403):
            if self.credentials.anonymous:
                raise Unauthorized(
                    f"unauthorized: authentication required; log in with "
                    f"`fastpull login {self.registry}`"
                )
            raise Unauthorized(
                f"unauthorized: the token server for {self.host} rejected the credentials"
            )
        if reply.status != 200:
            raise ProtocolError(
                f"token server {redact_url(request.url)} answered HTTP {reply.status}",
                status=reply.status,
            )
        token = auth.parse_token_response(reply.body, now=self._clock())
        self._tokens.put(key, token)
        return {"Authorization": f"Bearer {token.value}"}

    def check_login(self) -> None:
        """Prove the credentials work, as ``docker login`` does before storing them."""
        url = f"{self.base_url}/v2/"
        challenge = self._challenge
        if challenge is None:
            return  # the registry asks for no authentication at all
        if challenge.scheme == "basic":
            reply = self.transport.request(
                "GET", url, {"Authorization": auth.basic_authorization(self.credentials)}
            )
        else:
            request = auth.token_request(
                challenge, scopes=[], credentials=self.credentials, registry_url=self.base_url
            )
            reply = self.transport.request(
                request.method, request.url, request.headers, request.body, MAX_SMALL_BODY
            )
        if reply.status in (401, 403):
            raise Unauthorized(f"login to {self.registry} failed: incorrect username or password")
        if reply.status != 200:
            raise http_error(reply, f"login to {self.registry}")

    def call(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None = None,
        max_body: int = MAX_SMALL_BODY,
    ) -> Response:
        """An authorized request; a 401 gets one authentication round and one retry."""
        if origin(url) != origin(self.base_url):
            raise ProtocolError(f"refusing to send registry credentials to {redact_url(url)}")
        hdrs = dict(headers or {})
        response = self.transport.request(
            method, url, {**hdrs, **self.authorization(scope)}, None, max_body
        )
        if response.status == 401 and not self.credentials.registry_token:
            fresh = self.authenticate(response, scope)
            response = self.transport.request(method, url, {**hdrs, **fresh}, None, max_body)
        return response

    def repository_url(self, repository: str, *parts: str) -> str:
        """``base/v2/<repository>/<parts...>`` with each part URL-quoted."""
        tail = "/".join(quote(p, safe=":") for p in parts)
        return f"{self.base_url}/v2/{repository}/{tail}"

    def get_manifest(self, repository: str, reference: str | Digest, what: str) -> FetchedManifest:
        """Fetch a manifest or index by tag or digest, verified against every digest known.

        ``what`` names the image in error messages (e.g. ``debian:latest``).
        """
        scope = auth.repository_scope(repository)
        url = self.repository_url(repository, "manifests", str(reference))
        try:
            response = self.call("GET", url, scope, {"Accept": ACCEPT}, max_body=MAX_MANIFEST_SIZE)
        except ResponseTooLarge:
            # The registry answered; what it answered is a document we refuse (exit 6).
            raise ManifestError(
                f"manifest for {what} is larger than {MAX_MANIFEST_SIZE} bytes; refused"
            ) from None
        if response.status != 200:
            raise http_error(response, f"manifest for {what}")
        header_digest = response.header("docker-content-digest")
        server_digest = None
        if header_digest:
            try:
                server_digest = Digest.parse(header_digest.strip())
            except FastpullError:
                raise ProtocolError(
                    f"manifest for {what}: invalid Docker-Content-Digest header"
                ) from None
            check_digest(response.body, server_digest, f"manifest for {what}")
        if isinstance(reference, Digest):
            check_digest(response.body, reference, f"manifest for {what}")
            digest = reference
        else:
            digest = server_digest or digest_of(response.body)
        return FetchedManifest(response.body, response.header("content-type"), digest)

    def list_tags(self, repository: str) -> list[str]:
        """Every tag of a repository, following ``Link: rel="next"`` pagination."""
        scope = auth.repository_scope(repository)
        url = self.repository_url(repository, "tags", "list")
        tags: list[str] = []
        seen: set[str] = set()
        for page in self._tag_pages(url, scope, repository):
            tags.extend(t for t in page if t not in seen)
            seen.update(page)
        return tags

    def _tag_pages(self, url: str, scope: str, repository: str) -> Iterator[list[str]]:
        visited: set[str] = set()
        next_url: str | None = url
        while next_url is not None:
            if next_url in visited or len(visited) >= MAX_TAG_PAGES:
                raise ProtocolError(f"tag list of {repository}: pagination loops; refused")
            visited.add(next_url)
            response = self.call("GET", next_url, scope)
            if response.status != 200:
                raise http_error(response, f"tag list of {repository}")
            try:
                body = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                raise ProtocolError(f"tag list of {repository} is not valid JSON") from None
            page = body.get("tags") if isinstance(body, dict) else None
            if page is None:
                page = []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise ProtocolError(f"tag list of {repository} is malformed")
            yield page
            next_url = _next_link(response, next_url)
            if next_url is not None and origin(next_url) != origin(self.base_url):
                raise ProtocolError(f"tag list of {repository}: Link points to another host")


def _next_link(response: Response, current: str) -> str | None:
    """The ``rel="next"`` target of a Link header, resolved against the current URL."""
    for header in response.header_all("link"):
        for part in header.split(","):
            target, _, params = part.partition(";")
            target = target.strip()
            if not (target.startswith("<") and target.endswith(">")):
                continue
            rels = [p.strip() for p in params.split(";")]
            if any(r.replace(" ", "") in ('rel="next"', "rel=next") for r in rels):
                return urljoin(current, target[1:-1])
    return None
