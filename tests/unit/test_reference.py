"""Tests for fastpull.reference: docker's reference grammar and normalization.

Expected values come from docker's own behaviour, mostly the cases in
distribution/reference's normalize_test.go and reference_test.go.
"""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastpull.errors import InvalidReference, UsageError
from fastpull.reference import DEFAULT_REGISTRY, DEFAULT_TAG, Reference
from fastpull.types import Digest

HEX64 = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
HEX128 = "f" * 128
SHA = f"sha256:{HEX64}"
SHA512 = f"sha512:{HEX128}"
BLAKE3 = f"blake3:{'0123456789abcdef' * 4}"
IMAGE_ID = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
SONG = "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev"
LONG_PATH = "a" * 255
LONG_TAG = "t" * 128

# input, registry, repository, tag, digest, str(), familiar
VALID = [
    ("debian", "docker.io", "library/debian", "latest", None,
     "docker.io/library/debian:latest", "debian:latest"),
    ("debian:12", "docker.io", "library/debian", "12", None,
     "docker.io/library/debian:12", "debian:12"),
    ("library/debian", "docker.io", "library/debian", "latest", None,
     "docker.io/library/debian:latest", "debian:latest"),
    ("docker.io/debian", "docker.io", "library/debian", "latest", None,
     "docker.io/library/debian:latest", "debian:latest"),
    ("docker.io/library/debian:bookworm-slim", "docker.io", "library/debian", "bookworm-slim",
     None, "docker.io/library/debian:bookworm-slim", "debian:bookworm-slim"),
    ("index.docker.io/debian", "docker.io", "library/debian", "latest", None,
     "docker.io/library/debian:latest", "debian:latest"),
    ("index.docker.io/library/ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base",
     "latest", None, "docker.io/library/ubuntu-12.04-base:latest", "ubuntu-12.04-base:latest"),
    ("index.docker.io/docker/docker", "docker.io", "docker/docker", "latest", None,
     "docker.io/docker/docker:latest", "docker/docker:latest"),
    # Docker keeps registry-1.docker.io as a registry of its own.
    ("registry-1.docker.io/library/debian", "registry-1.docker.io", "library/debian", "latest",
     None, "registry-1.docker.io/library/debian:latest",
     "registry-1.docker.io/library/debian:latest"),
    ("user/repo", "docker.io", "user/repo", "latest", None,
     "docker.io/user/repo:latest", "user/repo:latest"),
    ("user/repo:1.0", "docker.io", "user/repo", "1.0", None,
     "docker.io/user/repo:1.0", "user/repo:1.0"),
    ("docker.io/dmcgowan/myapp:latest", "docker.io", "dmcgowan/myapp", "latest", None,
     "docker.io/dmcgowan/myapp:latest", "dmcgowan/myapp:latest"),
    ("library/foo/bar", "docker.io", "library/foo/bar", "latest", None,
     "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
    ("store/foo/bar", "docker.io", "store/foo/bar", "latest", None,
     "docker.io/store/foo/bar:latest", "store/foo/bar:latest"),
    ("other/library", "docker.io", "other/library", "latest", None,
     "docker.io/other/library:latest", "other/library:latest"),
    ("test_com/foo", "docker.io", "test_com/foo", "latest", None,
     "docker.io/test_com/foo:latest", "test_com/foo:latest"),
    ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest", "localhost/x:latest"),
    (f"localhost:5000/foo:1.0@{SHA}", "localhost:5000", "foo", "1.0", SHA,
     f"localhost:5000/foo:1.0@{SHA}", f"localhost:5000/foo:1.0@{SHA}"),
    # Without a '/', localhost, a domain or host:port is an image name (and a tag).
    ("localhost", "docker.io", "library/localhost", "latest", None,
     "docker.io/library/localhost:latest", "localhost:latest"),
    ("localhost:5000", "docker.io", "library/localhost", "5000", None,
     "docker.io/library/localhost:5000", "localhost:5000"),
    ("example.com", "docker.io", "library/example.com", "latest", None,
     "docker.io/library/example.com:latest", "example.com:latest"),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None,
     "192.168.1.1:5000/repo:5050", "192.168.1.1:5000/repo:5050"),
    ("127.0.0.1:5000/library/debian", "127.0.0.1:5000", "library/debian", "latest", None,
     "127.0.0.1:5000/library/debian:latest", "127.0.0.1:5000/library/debian:latest"),
    ("192.168.0.1/debian", "192.168.0.1", "debian", "latest", None,
     "192.168.0.1/debian:latest", "192.168.0.1/debian:latest"),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000/x:latest",
     "[::1]:5000/x:latest"),
    ("[2001:db8::1]/repo:tag", "[2001:db8::1]", "repo", "tag", None,
     "[2001:db8::1]/repo:tag", "[2001:db8::1]/repo:tag"),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", "[fc00:1:2:3:4:5:6:7]:5000", "library/debian",
     "latest", None, "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
     "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest"),
    ("ghcr.io/owner/app:v1.2.3", "ghcr.io", "owner/app", "v1.2.3", None,
     "ghcr.io/owner/app:v1.2.3", "ghcr.io/owner/app:v1.2.3"),
    ("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app",
     "test.example.com", None, "b.gcr.io/test.example.com/my-app:test.example.com",
     "b.gcr.io/test.example.com/my-app:test.example.com"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None,
     "xn--n3h.com:18080/foo:latest", "xn--n3h.com:18080/foo:latest"),
    ("test-com:8080/foo", "test-com:8080", "foo", "latest", None,
     "test-com:8080/foo:latest", "test-com:8080/foo:latest"),
    # A first component with capitals can only be a host (paths are lowercase).
    ("Docker/docker", "Docker", "docker", "latest", None, "Docker/docker:latest",
     "Docker/docker:latest"),
    ("Registry.Example.COM:443/team/app", "Registry.Example.COM:443", "team/app", "latest",
     None, "Registry.Example.COM:443/team/app:latest", "Registry.Example.COM:443/team/app:latest"),
    ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", None,
     "docker.io/library/lowercase:Uppercase", "lowercase:Uppercase"),
    (f"debian@{SHA}", "docker.io", "library/debian", None, SHA,
     f"docker.io/library/debian@{SHA}", f"debian@{SHA}"),
    (f"busybox:latest@{SHA}", "docker.io", "library/busybox", "latest", SHA,
     f"docker.io/library/busybox:latest@{SHA}", f"busybox:latest@{SHA}"),
    (f"dmcgowan/myapp@{SHA512}", "docker.io", "dmcgowan/myapp", None, SHA512,
     f"docker.io/dmcgowan/myapp@{SHA512}", f"dmcgowan/myapp@{SHA512}"),
    (f"example.com/app@{BLAKE3}", "example.com", "app", None, BLAKE3,
     f"example.com/app@{BLAKE3}", f"example.com/app@{BLAKE3}"),
    # A 64-hex name is fine once it is not alone.
    (f"docker.io/{IMAGE_ID}", "docker.io", f"library/{IMAGE_ID}", "latest", None,
     f"docker.io/library/{IMAGE_ID}:latest", f"{IMAGE_ID}:latest"),
    (SONG, "docker.io", f"library/{SONG}", "latest", None,
     f"docker.io/library/{SONG}:latest", f"{SONG}:latest"),
    ("dock__er/docker---rules", "docker.io", "dock__er/docker---rules", "latest", None,
     "docker.io/dock__er/docker---rules:latest", "dock__er/docker---rules:latest"),
    ("d/t", "docker.io", "d/t", "latest", None, "docker.io/d/t:latest", "d/t:latest"),
    # The limits are inclusive, and the registry does not count towards the 255.
    (f"example.com/{LONG_PATH}:{LONG_TAG}", "example.com", LONG_PATH, LONG_TAG, None,
     f"example.com/{LONG_PATH}:{LONG_TAG}", f"example.com/{LONG_PATH}:{LONG_TAG}"),
    # fastpull keeps docker.io/ where docker's short form would name another registry.
    ("docker.io/localhost/x", "docker.io", "localhost/x", "latest", None,
     "docker.io/localhost/x:latest", "docker.io/localhost/x:latest"),
    ("docker.io/foo.com/bar", "docker.io", "foo.com/bar", "latest", None,
     "docker.io/foo.com/bar:latest", "docker.io/foo.com/bar:latest"),
]  # fmt: skip

# input, fragment of the message
INVALID = [
    ("", "reference is empty"),
    ("Debian", "repository name must be lowercase"),
    ("Uppercase:tag", "repository name must be lowercase"),
    ("docker/Docker", "repository name must be lowercase"),
    ("docker.io/docker/Docker", "repository name must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
    ("Foo_Bar/x", "repository name must be lowercase"),
    ("foo:-tag", "invalid tag '-tag'"),
    ("foo:.tag", "invalid tag '.tag'"),
    ("foo:tag!", "invalid tag 'tag!'"),
    ("foo:täg", "invalid tag"),
    ("foo:" + "a" * 129, "tag is longer than 128 characters"),
    ("foo:", "tag is empty"),
    ("a:b:c", "invalid tag 'b:c'"),
    ("foo:bar/baz", "invalid registry host 'foo:bar'"),
    ("foo:bar@sha256:x/y", "invalid registry host"),
    ("localhost/foo:bar/baz", "invalid tag 'bar/baz'"),
    ("example.com/" + "a" * 256, "repository name must not be longer than 255 characters"),
    ("a/" * 128 + "a", "repository name must not be longer than 255 characters"),
    (":tag", "repository name is missing"),
    (f"@{SHA}", "repository name is missing"),
    ("a//b", "empty path component"),
    ("docker///docker", "empty path component"),
    ("a/", "empty path component"),
    ("docker/", "empty path component"),
    ("/a", "empty path component"),
    ("foo@sha256:short", "invalid digest 'sha256:short'"),
    ("foo@", "invalid digest ''"),
    (f"foo@sha256:{HEX64[:40]}", "invalid sha256 digest"),
    (f"foo@sha256:{HEX64.upper()}", "invalid sha256 digest"),
    (f"foo@sha256:{HEX64}@x", "invalid digest"),
    (f"foo@md5:{'a' * 32}", "unsupported digest algorithm 'md5'"),
    (f"foo@sha384:{'a' * 96}", "unsupported digest algorithm 'sha384'"),
    (f"foo@SHA256:{HEX64}", "unsupported digest algorithm 'SHA256'"),
    (IMAGE_ID, "cannot specify 64-byte hexadecimal strings"),
    ("-leading-dash", "invalid repository name component '-leading-dash'"),
    ("-docker/docker", "invalid repository name component '-docker'"),
    ("docker-/docker", "invalid repository name component 'docker-'"),
    ("____/____", "invalid repository name component '____'"),
    ("_docker/_docker", "invalid repository name component '_docker'"),
    # A first component with a '.' is a registry, whatever else it holds.
    ("dock..er/docker", "invalid registry host 'dock..er'"),
    ("dock_.er/docker", "invalid registry host 'dock_.er'"),
    ("docker/dock..er", "invalid repository name component 'dock..er'"),
    ("docker/dock_.er", "invalid repository name component 'dock_.er'"),
    ("docker/dock-.er", "invalid repository name component 'dock-.er'"),
    ("dock___er/docker", "invalid repository name component"),
    ("aa/asdf$$^/aa", "invalid repository name component 'asdf$$^'"),
    (" debian", "must not contain whitespace"),
    ("debian ", "must not contain whitespace"),
    ("debian\n", "must not contain whitespace"),
    ("deb ian:1", "must not contain whitespace"),
    ("debian:\t1", "must not contain whitespace"),
    ("localhost:5000:foo/bar", "invalid registry host 'localhost:5000:foo'"),
    ("-docker.io/docker/docker", "invalid registry host '-docker.io'"),
    ("https://github.com/docker/docker", "invalid registry host 'https:'"),
    ("foo_bar.com/x", "invalid registry host 'foo_bar.com'"),
    ("::1/x", "IPv6 addresses must be in brackets"),
    ("fc00::1:5000/debian", "IPv6 addresses must be in brackets"),
    ("[fe80::1%eth0]:5000/debian", "invalid registry host"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry host"),
    ("[fc00::1]", "invalid repository name component"),
    ("[fc00::1]:5000", "invalid repository name component"),
    ("localhost:65536/x", "registry port in 'localhost:65536' is out of range"),
    ("localhost:" + "9" * 5000 + "/x", "is out of range"),
]


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "full", "familiar"), VALID
)
def test_parse_valid(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    full: str,
    familiar: str,
) -> None:
    ref = Reference.parse(text)
    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert str(ref) == full
    assert ref.familiar == familiar
    assert Reference.parse(full) == ref
    assert Reference.parse(familiar) == ref


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    message = str(info.value)
    assert message.startswith("invalid reference format: ")
    assert fragment in message
    # Messages quote user text, but never all of a huge input.
    assert len(message) < 400


def test_invalid_reference_is_a_usage_error_and_a_value_error() -> None:
    with pytest.raises(ValueError) as info:
        Reference.parse("UPPER")
    err = info.value
    assert isinstance(err, UsageError)
    assert err.exit_code == 2
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is InvalidReference
    assert str(copy) == str(err)


@pytest.mark.parametrize(
    "text",
    [
        "a-" * 50_000 + "!",
        "a." * 50_000 + "-/x",
        "a" + "-" * 100_000 + "/b",
        "[" + "1:" * 50_000 + "/x",
        "a/" * 50_000,
        "x:" + "a" * 100_000,
        "foo@sha256:" + "a" * 100_000,
        "a" * 100_000 + ":" * 1000,
    ],
)
def test_huge_inputs_are_refused_without_backtracking(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_names() -> None:
    ref = Reference.parse("debian")
    assert ref.name == "docker.io/library/debian"
    assert ref.familiar_name == "debian"
    assert Reference.parse("user/repo:1").familiar_name == "user/repo"
    assert Reference.parse("localhost:5000/foo").familiar_name == "localhost:5000/foo"
    assert Reference.parse("localhost:5000/foo").name == "localhost:5000/foo"
    assert Reference.parse("library/a/b").familiar_name == "library/a/b"
    # Docker prints a familiar 64-hex name alone; only the name with a tag parses back.
    assert Reference.parse(f"docker.io/{IMAGE_ID}").familiar_name == IMAGE_ID
    assert DEFAULT_REGISTRY == "docker.io"
    assert DEFAULT_TAG == "latest"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("debian", "docker.io", None),
        ("localhost/x", "localhost", None),
        ("localhost:5000/x", "localhost", 5000),
        ("[::1]:5000/x", "::1", 5000),
        ("[2001:db8::1]/x", "2001:db8::1", None),
        ("127.0.0.1:80/x", "127.0.0.1", 80),
        ("Registry.Example.COM:0443/x", "registry.example.com", 443),
        ("localhost:" + "0" * 5000 + "80/x", "localhost", 80),
    ],
)
def test_registry_host_and_port(text: str, host: str, port: int | None) -> None:
    ref = Reference.parse(text)
    assert ref.registry_host == host
    assert ref.registry_port == port


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("localhost/x", True),
        ("localhost:5000/x", True),
        ("LocalHost:5000/x", True),
        ("127.0.0.1/x", True),
        ("127.0.0.1:5000/x", True),
        ("127.8.9.10:5000/x", True),
        ("[::1]/x", True),
        ("[::1]:5000/x", True),
        ("[0:0:0:0:0:0:0:1]:5000/x", True),
        ("[::ffff:7f00:1]:5000/x", True),
        ("debian", False),
        ("localhost", False),  # an image called localhost, on Docker Hub
        ("docker.io/localhost/x", False),
        ("localhost.example.com/x", False),
        ("128.0.0.1:5000/x", False),
        ("10.0.0.1/x", False),
        ("[::2]:5000/x", False),
        ("[::ffff:a00:1]/x", False),
        ("127.1/x", False),  # not an address by ipaddress' reading; safer to say no
        ("[:::]/x", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert Reference.parse(text).is_loopback is loopback


def test_with_tag_and_with_digest() -> None:
    ref = Reference.parse("debian")
    digest = Digest.parse(SHA)
    tagged = ref.with_tag("12")
    assert str(tagged) == "docker.io/library/debian:12"
    pinned = ref.with_digest(digest)
    assert str(pinned) == f"docker.io/library/debian:latest@{SHA}"
    assert pinned.familiar == f"debian:latest@{SHA}"
    # with_tag keeps the digest, as distribution/reference's WithTag does.
    assert pinned.with_tag("12") == Reference("docker.io", "library/debian", "12", digest)
    by_digest = Reference.parse(f"debian@{SHA}")
    assert by_digest.with_tag("12").digest == digest
    assert ref == Reference.parse("debian")  # unchanged
    with pytest.raises(InvalidReference, match="invalid tag"):
        ref.with_tag("bad tag")
    with pytest.raises(InvalidReference, match="tag is longer than 128 characters"):
        ref.with_tag("x" * 129)


def test_references_are_frozen_and_hashable() -> None:
    ref = Reference.parse("debian")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "12"  # type: ignore[misc]
    assert {ref, Reference.parse("docker.io/library/debian:latest")} == {ref}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (("index.docker.io", "library/x", "latest", None), "not normalized"),
        (("docker.io", "debian", "latest", None), "not normalized"),
        (("foo", "bar", "latest", None), "not normalized"),
        (("docker.io", "library/debian", None, None), "needs a tag or a digest"),
        (("docker.io", "library/Debian", "latest", None), "must be lowercase"),
        (("", "x", "latest", None), "invalid registry host ''"),
        (("ghcr.io", "a//b", "latest", None), "empty path component"),
        (("ghcr.io", "x", "", None), "tag is empty"),
    ],
)
def test_constructor_accepts_only_normalized_fields(
    fields: tuple[str, str, str | None, Digest | None], fragment: str
) -> None:
    with pytest.raises(InvalidReference, match=re.escape(fragment)):
        Reference(*fields)


# --- property tests -----------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
HEX = "0123456789abcdef"

path_components = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    st.text(ALNUM, min_size=1, max_size=8),
    st.lists(
        st.tuples(
            st.sampled_from([".", "_", "__", "-", "--"]), st.text(ALNUM, min_size=1, max_size=8)
        ),
        max_size=3,
    ),
)
paths = st.lists(path_components, min_size=1, max_size=4).map("/".join)
labels = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
ports = st.integers(0, 65535).map(lambda port: f":{port}")
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda address: f"[{address.exploded}]")
registries = st.one_of(
    st.lists(labels, min_size=2, max_size=4).map(".".join),
    st.tuples(st.lists(labels, min_size=1, max_size=3).map(".".join), ports).map("".join),
    st.tuples(st.sampled_from(["localhost", "docker.io"]), ports | st.just("")).map("".join),
    st.tuples(ipv4, ports | st.just("")).map("".join),
    st.tuples(ipv6, ports | st.just("")).map("".join),
    labels.filter(lambda label: label.lower() != label),
    st.sampled_from(["docker.io", "registry-1.docker.io", "ghcr.io", "[::1]:5000"]),
).filter(lambda registry: registry != "index.docker.io")
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
digests = st.one_of(
    st.text(HEX, min_size=64, max_size=64).map(lambda hex_: Digest("sha256", hex_)),
    st.text(HEX, min_size=128, max_size=128).map(lambda hex_: Digest("sha512", hex_)),
    st.text(HEX, min_size=64, max_size=64).map(lambda hex_: Digest("blake3", hex_)),
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = draw(registries)
    path = draw(paths)
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = "library/" + path
    tag = draw(st.none() | tags)
    digest = draw(st.none() | digests)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def check_invariants(ref: Reference) -> None:
    assert ref.repository == ref.repository.lower()
    assert len(ref.repository) <= 255
    assert ref.tag is not None or ref.digest is not None
    if ref.tag is not None:
        assert 1 <= len(ref.tag) <= 128
    assert Reference.parse(str(ref)) == ref
    assert Reference.parse(ref.familiar) == ref


@settings(max_examples=200, deadline=None)
@given(references())
def test_round_trip(ref: Reference) -> None:
    check_invariants(ref)
    assert str(ref).startswith(ref.registry + "/")
    if ref.registry != DEFAULT_REGISTRY:
        assert ref.familiar == str(ref)


@settings(max_examples=200, deadline=None)
@given(st.one_of(registries, st.just("")), paths, st.none() | tags, st.none() | digests)
def test_parse_of_composed_text(
    registry: str, path: str, tag: str | None, digest: Digest | None
) -> None:
    first = path.partition("/")[0]
    # Without a registry, a first component that looks like a host is read as one.
    assume(registry or "/" not in path or ("." not in first and first != "localhost"))
    text = (f"{registry}/" if registry else "") + path
    text += (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")
    ref = Reference.parse(text)
    check_invariants(ref)
    assert ref.tag == (DEFAULT_TAG if tag is None and digest is None else tag)
    assert ref.digest == digest


# Pieces that reach deep into the grammar when strung together at random.
FRAGMENTS = [
    "a", "b", "Z", "0", "9", ":", "/", "@", ".", "_", "__", "-", "--", "[", "]", "::1", " ",
    "\n", "é", "\x00", "%", "localhost", "docker.io", "index.docker.io", "library", "5000",
    "65536", "latest", SHA, SHA512, BLAKE3, f"md5:{'a' * 32}", "sha256:abc", HEX64, IMAGE_ID,
    "A" * 64,
]  # fmt: skip


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """A valid reference with one character replaced by a fragment."""
    text = str(draw(references()))
    cut = draw(st.integers(0, len(text) - 1))
    return text[:cut] + draw(st.sampled_from(FRAGMENTS)) + text[cut + 1 :]


texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    near_misses(),
)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_arbitrary_text_parses_or_raises_invalid_reference(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReference as err:
        assert str(err).startswith("invalid reference format: ")
        return
    check_invariants(ref)


# --- differential test against a direct port of docker's regexp-based parser ------------
#
# ParseNormalizedNamed composes domain + "/" + remainder and matches it against the full
# ReferenceRegexp. fastpull parses piece by piece to say what is wrong; this checks the
# two accept the same references. Known, deliberate differences: docker accepts a
# "registry" such as foo_bar.com that fails the domain grammar by reading the whole name as
# a path with an empty domain (it cannot pull that), and ports above 65535; fastpull
# refuses both. The digest algorithms are fastpull's (docker has sha384, not blake3).

_GO_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_GO_DOMAIN_AND_PORT = (
    rf"(?:{_GO_DOMAIN_COMPONENT}(?:\.{_GO_DOMAIN_COMPONENT})*|\[(?:[a-fA-F0-9:]+)\])"
    r"(?::[0-9]+)?"
)
_GO_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_GO_REMOTE_NAME = rf"{_GO_PATH_COMPONENT}(?:/{_GO_PATH_COMPONENT})*"
_GO_NAME = rf"(?:{_GO_DOMAIN_AND_PORT}/)?{_GO_REMOTE_NAME}"
_GO_TAG = r"[0-9A-Za-z_][0-9A-Za-z_.-]{0,127}"
_GO_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
GO_REFERENCE = re.compile(rf"({_GO_NAME})(?::({_GO_TAG}))?(?:@({_GO_DIGEST}))?")
GO_ANCHORED_NAME = re.compile(rf"(?:({_GO_DOMAIN_AND_PORT})/)?({_GO_REMOTE_NAME})")
ENCODED = {"sha256": "[a-f0-9]{64}", "sha512": "[a-f0-9]{128}", "blake3": "[a-f0-9]{64}"}


def docker_parse(text: str) -> tuple[str, str, str | None, str | None] | None:
    """(domain, path, tag, digest) as docker parses ``text``, or None if it refuses it."""
    if re.fullmatch(r"[a-f0-9]{64}", text):
        return None
    first, slash, rest = text.partition("/")
    if not slash:
        domain, remainder = "docker.io", "library/" + text
    else:
        if first == "localhost":
            domain, remainder = first, rest
        elif first == "index.docker.io":
            domain, remainder = "docker.io", rest
        elif re.search(r"[.:]", first) or first.lower() != first:
            domain, remainder = first, rest
        else:
            domain, remainder = "docker.io", text
        if domain == "docker.io" and "/" not in remainder:
            remainder = "library/" + remainder
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return None
    match = GO_REFERENCE.fullmatch(domain + "/" + remainder)
    if match is None:
        return None
    name = GO_ANCHORED_NAME.fullmatch(match[1])
    assert name is not None
    path = name[2]
    if len(path) > 255:
        return None
    digest = match[3]
    if digest is not None:
        algorithm, _, encoded = digest.partition(":")
        if algorithm not in ENCODED or not re.fullmatch(ENCODED[algorithm], encoded):
            return None
    # TagNameOnly: "latest" only when there is neither a tag nor a digest.
    tag = match[2] if match[2] is not None or digest is not None else "latest"
    return name[1] or "", path, tag, digest


def fastpull_parse(text: str) -> tuple[str, str, str | None, str | None] | None:
    try:
        ref = Reference.parse(text)
    except InvalidReference:
        return None
    return ref.registry, ref.repository, ref.tag, str(ref.digest) if ref.digest else None


def assert_agrees_with_docker(text: str) -> None:
    ours = fastpull_parse(text)
    theirs = docker_parse(text)
    if theirs is not None:
        domain = theirs[0]
        port = domain.rpartition("]")[2].partition(":")[2].lstrip("0")
        if domain == "" or len(port) > 5 or (port and int(port) > 65535):
            assert ours is None, text
            return
    assert ours == theirs, text


@pytest.mark.parametrize(
    "text",
    [row[0] for row in VALID]
    + [row[0] for row in INVALID if len(row[0]) < 1000]
    + ["foo_bar.com/x", "a.b_c/x", "localhost:99999/x", "Foo/bar", "FOO/bar:Tag"],
)
def test_tables_agree_with_docker(text: str) -> None:
    assert_agrees_with_docker(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(texts, references().map(str), references().map(lambda ref: ref.familiar)))
def test_agrees_with_docker(text: str) -> None:
    assert_agrees_with_docker(text)
