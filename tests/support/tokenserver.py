"""A Docker token-authentication server of the tests' own, run in a background thread.

It implements what clients exercise of Docker's token auth (distribution's
``docs/spec/auth/token.md`` and ``oauth.md``):

* ``GET <realm>?service=&scope=&account=&offline_token=`` with optional Basic credentials;
* ``POST <realm>`` with a form body and ``grant_type=password`` or ``grant_type=refresh_token``.

Tokens are RS256 JWTs whose header carries the signing certificate in ``x5c``; that self-signed
certificate is written to :attr:`TokenServer.rootcertbundle_path` for the registry's
``auth.token.rootcertbundle``. Every request is recorded for assertions, and the behaviour
(users, ACLs, response shape, lifetimes, injected failures) lives in a mutable
:class:`TokenPolicy` so tests can change a running server and :meth:`TokenServer.reset` it.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import fnmatch
import json
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.netutil import LoopbackService, TrackedHandler, serving_context

# What an authenticated user may do by default; distribution 2.8 asks for "delete" on DELETE.
FULL_ACCESS = ("pull", "push", "delete")

# The token spec's default when a response carries no expires_in.
DEFAULT_TOKEN_LIFETIME = 60

Failure = Literal["500", "garbage"]


@dataclass
class TokenPolicy:
    """How a :class:`TokenServer` answers; attributes may be changed while it runs.

    ``acl`` maps a username (``None`` for anonymous) to ``{repository glob: actions}``. When
    ``acl`` is ``None`` every authenticated user gets :data:`FULL_ACCESS` on every repository and
    anonymous users get ``pull`` (if ``allow_anonymous``). Scopes of other resource types (such
    as ``registry:catalog:*``) are granted in full to authenticated users only.

    ``identity_tokens`` maps a token to the username it stands for; such tokens are accepted as
    ``refresh_token`` in the POST grant, as Docker's identity tokens are.

    ``expires_in`` is both reported and used as the JWT lifetime; ``None`` omits it from the
    response and issues tokens with the spec's 60 s default. ``time_offset`` shifts the token
    clock (``iat``, ``nbf``, ``exp``, ``issued_at``): a large negative value issues tokens that
    are already expired.

    ``failure`` makes the realm answer ``500`` or a 200 with a non-JSON body, for the next
    ``failure_count`` requests (or forever when ``failure_count`` is ``None``).
    """

    users: dict[str, str] = field(default_factory=dict)
    allow_anonymous: bool = True
    acl: dict[str | None, dict[str, Collection[str]]] | None = None
    identity_tokens: dict[str, str] = field(default_factory=dict)
    token_field: Literal["token", "access_token", "both"] = "both"
    expires_in: int | None = 300
    time_offset: float = 0.0
    support_post: bool = True
    failure: Failure | None = None
    failure_count: int | None = None

    def granted_actions(self, username: str | None, scope: Scope) -> list[str]:
        """Return the subset of ``scope.actions`` that ``username`` may perform."""
        if scope.type != "repository":
            return list(scope.actions) if username is not None else []
        if self.acl is None:
            if username is not None:
                rules: dict[str, Collection[str]] = {"*": FULL_ACCESS}
            else:
                rules = {"*": ("pull",)} if self.allow_anonymous else {}
        else:
            rules = self.acl.get(username, {})
        allowed: set[str] = set()
        for pattern, actions in rules.items():
            if fnmatch.fnmatchcase(scope.name, pattern):
                allowed.update(actions)
        if "*" in allowed:
            return list(scope.actions)
        return [action for action in scope.actions if action in allowed]


@dataclass(frozen=True)
class Scope:
    """One ``type:name:actions`` scope, such as ``repository:library/busybox:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse a scope string; the name may itself contain colons, so split from both ends."""
        head, sep, actions = text.rpartition(":")
        resource_type, sep2, name = head.partition(":")
        if not sep or not sep2 or not resource_type or not name:
            raise ValueError(f"malformed scope {text!r}")
        return cls(resource_type, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received, for assertions."""

    method: str
    path: str
    query: dict[str, list[str]]
    basic_auth: bool
    username: str | None
    grant_type: str | None
    scopes: tuple[str, ...]
    status: int


class _BadRequest(Exception):
    """Raised inside request handling to answer with an OAuth-style error body."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(header, claims)`` of a JWT without verifying it (for test assertions)."""
    header_b64, claims_b64, _signature = token.split(".")

    def part(text: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))

    return part(header_b64), part(claims_b64)


def _make_signer() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """Create the token-signing key and the self-signed certificate the registry will trust."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastpull test token signer")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated so tests that shift the token clock never trip the certificate's validity.
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class _Handler(TrackedHandler):
    def do_GET(self) -> None:
        self.server.owner._handle(self)

    def do_POST(self) -> None:
        self.server.owner._handle(self)


class TokenServer(LoopbackService):
    """Docker token server on ``127.0.0.1`` (HTTPS with a trustme certificate by default)."""

    handler = _Handler
    thread_name = "fastpull-token-server"

    def __init__(
        self,
        policy: TokenPolicy | None = None,
        *,
        service: str = "fastpull-test-registry",
        issuer: str = "fastpull-test-token-issuer",
        tls: bool = True,
        ca: trustme.CA | None = None,
        workdir: str | Path | None = None,
        path: str = "/token",
    ) -> None:
        self.policy = policy if policy is not None else TokenPolicy()
        self._initial_policy = copy.deepcopy(self.policy)
        self.service = service
        self.issuer = issuer
        super().__init__(tls=tls)
        self.ca: trustme.CA | None = (ca or trustme.CA()) if tls else None
        self.path = path
        self._workdir = Path(workdir) if workdir is not None else None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._key, self._cert = _make_signer()
        self._x5c = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}
        self.rootcertbundle_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Write the certificate files and start serving; returns ``self``."""
        if self._workdir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="fastpull-tokens-")
            self._workdir = Path(self._scratch.name)
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.rootcertbundle_path = self._workdir / "token-signer.pem"
        self.rootcertbundle_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        return super().start()

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.ca is not None and self._workdir is not None
        self.ca_path = self._workdir / "token-server-ca.pem"
        return serving_context(self.ca, self.ca_path)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and remove temporary files."""
        super().stop(timeout)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
            self._workdir = None

    # -- public state ----------------------------------------------------------------------

    @property
    def ca_pem_path(self) -> Path | None:
        """The CA certificate that signed this server's (None without TLS)."""
        return self.ca_path

    @property
    def realm(self) -> str:
        """The realm URL to put in the registry's ``auth.token.realm``."""
        return f"{'https' if self.tls else 'http'}://{self.host}{self.path}"

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every request received so far."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget recorded requests."""
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Restore the policy given at construction and forget requests and refresh tokens."""
        with self._lock:
            self.policy = copy.deepcopy(self._initial_policy)
            self._requests.clear()
            self._refresh_tokens.clear()

    # -- tokens ----------------------------------------------------------------------------

    def issue_token(
        self,
        username: str | None,
        scopes: Iterable[str | Scope] = (),
        *,
        lifetime: int | None = None,
        now: float | None = None,
    ) -> str:
        """Mint a signed JWT granting what the policy allows ``username`` within ``scopes``.

        ``now`` and ``lifetime`` override the policy's clock and ``expires_in``, so tests can
        forge tokens with any ``exp`` without going through HTTP.
        """
        policy = self.policy
        if now is None:
            now = time.time() + policy.time_offset
        if lifetime is None:
            lifetime = (
                policy.expires_in if policy.expires_in is not None else DEFAULT_TOKEN_LIFETIME
            )
        issued = int(now)
        access = []
        for scope in _merge_scopes(scopes):
            actions = policy.granted_actions(username, scope)
            if actions:
                access.append({"type": scope.type, "name": scope.name, "actions": actions})
        header = {"alg": "RS256", "typ": "JWT", "x5c": self._x5c}
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            # distribution 2.8 decodes aud as a single string, so never send a list.
            "aud": self.service,
            "exp": issued + lifetime,
            "nbf": issued,
            "iat": issued,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    # -- request handling ------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        form: dict[str, list[str]] = {}
        if handler.command == "POST":
            length = int(handler.headers.get("Content-Length") or 0)
            body = handler.rfile.read(length).decode("utf-8", "replace")
            form = parse_qs(body, keep_blank_values=True)
        basic_present, credentials = _parse_basic(handler.headers.get("Authorization"))
        params = form if handler.command == "POST" else query
        grant_type = _first(form, "grant_type")
        username = credentials[0] if credentials else _first(form, "username")
        scopes = tuple(s for value in params.get("scope", []) for s in value.split())

        headers = {"Content-Type": "application/json"}
        failure = self._take_failure() if parts.path == self.path else None
        if parts.path != self.path:
            status, payload = 404, json.dumps({"error": "not_found"}).encode()
        elif failure == "500":
            status, payload = 500, json.dumps({"error": "injected failure"}).encode()
        elif failure == "garbage":
            status, payload = 200, b"<html>this is not the token you are looking for"
        else:
            try:
                answer = self._answer(handler.command, params, basic_present, credentials, scopes)
                status = 200
            except _BadRequest as exc:
                status, answer = exc.status, {"error": exc.error, "error_description": str(exc)}
                if exc.status == 401:
                    headers["WWW-Authenticate"] = 'Basic realm="fastpull-test-token-server"'
            payload = json.dumps(answer).encode()

        with self._lock:
            self._requests.append(
                TokenRequest(
                    method=handler.command,
                    path=parts.path,
                    query=query,
                    basic_auth=basic_present,
                    username=username,
                    grant_type=grant_type,
                    scopes=scopes,
                    status=status,
                )
            )
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _take_failure(self) -> Failure | None:
        with self._lock:
            policy = self.policy
            if policy.failure is None:
                return None
            if policy.failure_count is not None:
                if policy.failure_count <= 0:
                    return None
                policy.failure_count -= 1
            return policy.failure

    def _answer(
        self,
        method: str,
        params: dict[str, list[str]],
        basic_present: bool,
        credentials: tuple[str, str] | None,
        scopes: tuple[str, ...],
    ) -> dict[str, Any]:
        policy = self.policy
        service = _first(params, "service")
        if service is not None and service != self.service:
            raise _BadRequest(400, "invalid_request", f"unknown service {service!r}")
        issue_refresh = False
        if method == "GET":
            if basic_present:
                # A Basic header that does not even decode is a failed login, not anonymity.
                username: str | None = self._check_password(*(credentials or ("", "")))
            elif policy.allow_anonymous:
                username = None
            else:
                raise _BadRequest(401, "unauthorized", "authentication required")
            issue_refresh = username is not None and _first(params, "offline_token") == "true"
        else:
            if not policy.support_post:
                raise _BadRequest(404, "not_found", "POST is not supported by this realm")
            grant_type = _first(params, "grant_type")
            if grant_type == "password":
                username = self._check_password(
                    _first(params, "username") or "", _first(params, "password") or ""
                )
                issue_refresh = _first(params, "access_type") == "offline"
            elif grant_type == "refresh_token":
                username = self._check_refresh_token(_first(params, "refresh_token") or "")
            else:
                raise _BadRequest(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
        try:
            parsed = [Scope.parse(s) for s in scopes]
        except ValueError as exc:
            raise _BadRequest(400, "invalid_scope", str(exc)) from None

        now = time.time() + policy.time_offset
        token = self.issue_token(username, parsed, now=now)
        answer: dict[str, Any] = {}
        if policy.token_field in ("token", "both"):
            answer["token"] = token
        if policy.token_field in ("access_token", "both"):
            answer["access_token"] = token
        if policy.expires_in is not None:
            answer["expires_in"] = policy.expires_in
        answer["issued_at"] = dt.datetime.fromtimestamp(int(now), dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        if issue_refresh and username is not None:
            refresh = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh_tokens[refresh] = username
            answer["refresh_token"] = refresh
        return answer

    def _check_password(self, username: str, password: str) -> str:
        if self.policy.users.get(username) != password or not username:
            raise _BadRequest(401, "invalid_grant", "bad username or password")
        return username

    def _check_refresh_token(self, token: str) -> str:
        with self._lock:
            username = self._refresh_tokens.get(token) or self.policy.identity_tokens.get(token)
        if username is None:
            raise _BadRequest(401, "invalid_grant", "unknown refresh token")
        return username


def _first(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def _parse_basic(header: str | None) -> tuple[bool, tuple[str, str] | None]:
    """Return whether Basic auth was sent and, if it decodes, ``(username, password)``."""
    if not header or not header.lower().startswith("basic "):
        return False, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return True, None
    username, sep, password = decoded.partition(":")
    return True, ((username, password) if sep else None)


def _merge_scopes(scopes: Iterable[str | Scope]) -> list[Scope]:
    """Combine repeated scopes for one resource, keeping first-seen order of actions."""
    merged: dict[tuple[str, str], list[str]] = {}
    for item in scopes:
        scope = Scope.parse(item) if isinstance(item, str) else item
        actions = merged.setdefault((scope.type, scope.name), [])
        actions.extend(a for a in scope.actions if a not in actions)
    return [Scope(t, n, tuple(a)) for (t, n), a in merged.items()]
