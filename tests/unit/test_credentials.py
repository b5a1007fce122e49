"""Tests for fastpull.registry.credentials: docker config.json lookup, helpers, login storage."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fastpull.errors import ConfigError, CredentialError
from fastpull.registry.credentials import (
    DOCKER_HUB_KEY,
    Credentials,
    CredentialStore,
    config_key,
    docker_config_dir,
)

SECRET = "s3cr3t-Pa55:word"
TOKEN = "identity-token-0123456789"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_AUTH_CONFIG", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)


def write_config(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "docker" / "config.json"


# A stand-in for docker-credential-helpers binaries. Like the real ones it prints its
# errors (including "credentials not found") on stdout and exits 1.
FAKE_HELPER = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys, time
    db = os.environ["FAKE_HELPER_DB"]
    action = sys.argv[1]
    data = sys.stdin.read()
    with open(db + ".log", "a") as log:
        log.write(json.dumps([action, data]) + "\\n")
    store = json.load(open(db)) if os.path.exists(db) else {{}}
    mode = os.environ.get("FAKE_HELPER_MODE", "")
    if mode == "fail":
        print("stdout-secret-xyz")
        sys.stderr.write("keychain is locked\\nsecond line\\n")
        sys.exit(1)
    if mode == "echo":
        sys.stderr.write("cannot parse " + data + "\\n")
        sys.exit(1)
    if mode == "garbage":
        print("not json stdout-secret-xyz")
        sys.exit(0)
    if mode == "sleep":
        time.sleep(30)
    if action == "get":
        entry = store.get(data.strip())
        if entry is None:
            print("credentials not found in native keychain")
            sys.exit(1)
        print(json.dumps({{"ServerURL": data, "Username": entry[0], "Secret": entry[1]}}))
    elif action == "store":
        creds = json.loads(data)
        store[creds["ServerURL"]] = [creds["Username"], creds["Secret"]]
        json.dump(store, open(db, "w"))
    elif action == "erase":
        if data.strip() not in store:
            print("credentials not found in native keychain")
            sys.exit(1)
        del store[data.strip()]
        json.dump(store, open(db, "w"))
    """
)


class FakeHelper:
    """Controls the fake ``docker-credential-fake`` helper installed on PATH."""

    def __init__(self, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.db = db
        self.monkeypatch = monkeypatch

    def seed(self, entries: dict[str, list[str]]) -> None:
        self.db.write_text(json.dumps(entries))

    def entries(self) -> dict[str, list[str]]:
        return json.loads(self.db.read_text()) if self.db.exists() else {}

    def calls(self) -> list[list[str]]:
        log = Path(str(self.db) + ".log")
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def mode(self, mode: str) -> None:
        self.monkeypatch.setenv("FAKE_HELPER_MODE", mode)


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHelper:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("fake", "other"):
        script = bindir / f"docker-credential-{name}"
        script.write_text(FAKE_HELPER.format(python=sys.executable))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    db = tmp_path / "helper-db.json"
    monkeypatch.setenv("FAKE_HELPER_DB", str(db))
    monkeypatch.delenv("FAKE_HELPER_MODE", raising=False)
    return FakeHelper(db, monkeypatch)


# -- Credentials, paths, keys --------------------------------------------------------------


def test_credentials_repr_hides_secrets() -> None:
    creds = Credentials("alice", SECRET, TOKEN, "registry-token-abc")
    text = repr(creds) + str(creds)
    assert "alice" in text
    for secret in (SECRET, TOKEN, "registry-token-abc"):
        assert secret not in text
    assert "password" in text and "identity_token" in text and "registry_token" in text


def test_credentials_anonymous() -> None:
    assert Credentials().anonymous
    assert not Credentials(username="a").anonymous
    assert not Credentials(registry_token="t").anonymous
    assert not Credentials(identity_token="t").anonymous


def test_docker_config_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert docker_config_dir() == tmp_path / ".docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "elsewhere"))
    assert docker_config_dir() == tmp_path / "elsewhere"
    assert CredentialStore().path == tmp_path / "elsewhere" / "config.json"


@pytest.mark.parametrize(
    ("registry", "key"),
    [
        ("docker.io", DOCKER_HUB_KEY),
        ("index.docker.io", DOCKER_HUB_KEY),
        ("ghcr.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ],
)
def test_config_key(registry: str, key: str) -> None:
    assert config_key(registry) == key


# -- auths lookup ----------------------------------------------------------------------------


def test_missing_file_is_anonymous(config: Path) -> None:
    assert CredentialStore(config).get("ghcr.io") == Credentials()


def test_empty_file_is_anonymous(config: Path) -> None:
    write_config(config, "  \n")
    assert CredentialStore(config).get("ghcr.io").anonymous


def test_auth_field(config: Path) -> None:
    write_config(config, {"auths": {"ghcr.io": {"auth": b64(f"bob:{SECRET}")}}})
    # The password itself contains ':'; only the first one separates.
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", SECRET)


def test_auth_field_strips_nul_padding_and_tolerates_missing_padding(config: Path) -> None:
    encoded = b64("bob:pw\x00\x00").rstrip("=")
    write_config(config, {"auths": {"ghcr.io": {"auth": encoded}}})
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", "pw")


def test_username_password_fields(config: Path) -> None:
    write_config(config, {"auths": {"ghcr.io": {"username": "bob", "password": SECRET}}})
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", SECRET)


def test_auth_field_wins_over_username_password(config: Path) -> None:
    entry = {"auth": b64("carol:pw"), "username": "bob", "password": "other"}
    write_config(config, {"auths": {"ghcr.io": entry}})
    assert CredentialStore(config).get("ghcr.io") == Credentials("carol", "pw")


def test_identity_and_registry_tokens(config: Path) -> None:
    write_config(
        config,
        {
            "auths": {
                "a.example": {"auth": b64("bob:"), "identitytoken": TOKEN},
                "b.example": {"registrytoken": "rt"},
            }
        },
    )
    store = CredentialStore(config)
    assert store.get("a.example") == Credentials("bob", "", identity_token=TOKEN)
    assert store.get("b.example") == Credentials(registry_token="rt")


@pytest.mark.parametrize(
    "key",
    [
        "myreg.example:5000",
        "https://myreg.example:5000",
        "http://myreg.example:5000",
        "https://myreg.example:5000/v1/",
        "http://myreg.example:5000/v2/",
        "myreg.example:5000/some/path",
        "MyReg.Example:5000",
    ],
)
def test_tolerant_key_matching(config: Path, key: str) -> None:
    write_config(config, {"auths": {key: {"auth": b64("bob:pw")}}})
    assert CredentialStore(config).get("myreg.example:5000") == Credentials("bob", "pw")


@pytest.mark.parametrize("key", ["myreg.example:5001", "myreg.example", "other.example:5000"])
def test_keys_for_other_registries_do_not_match(config: Path, key: str) -> None:
    write_config(config, {"auths": {key: {"auth": b64("bob:pw")}}})
    assert CredentialStore(config).get("myreg.example:5000").anonymous


@pytest.mark.parametrize(
    "key",
    [
        "https://index.docker.io/v1/",
        "index.docker.io",
        "docker.io",
        "https://docker.io",
        "registry-1.docker.io",
        "https://registry-1.docker.io/v2/",
    ],
)
def test_docker_hub_keys(config: Path, key: str) -> None:
    write_config(config, {"auths": {key: {"auth": b64("bob:pw")}}})
    assert CredentialStore(config).get("docker.io") == Credentials("bob", "pw")


def test_exact_key_wins_over_equivalent_key(config: Path) -> None:
    auths = {"docker.io": {"auth": b64("old:pw")}, DOCKER_HUB_KEY: {"auth": b64("new:pw")}}
    write_config(config, {"auths": auths})
    assert CredentialStore(config).get("docker.io").username == "new"


def test_docker_auth_config_overrides_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(config, {"auths": {"ghcr.io": {"auth": b64("file:pw")}}})
    env = {"auths": {"https://ghcr.io": {"auth": b64("env:pw")}}}
    monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps(env))
    store = CredentialStore(config)
    assert store.get("ghcr.io") == Credentials("env", "pw")


def test_docker_auth_config_falls_back_to_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(config, {"auths": {"ghcr.io": {"auth": b64("file:pw")}}})
    monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps({"auths": {"quay.io": {}}}))
    assert CredentialStore(config).get("ghcr.io") == Credentials("file", "pw")


def test_docker_auth_config_works_without_a_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"auths": {DOCKER_HUB_KEY: {"auth": b64("env:pw")}}}
    monkeypatch.setenv("DOCKER_AUTH_CONFIG", json.dumps(env))
    assert CredentialStore(config).get("docker.io") == Credentials("env", "pw")


def test_broken_docker_auth_config(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_AUTH_CONFIG", '{"auths": {"ghcr.io": {"auth": "' + SECRET)
    with pytest.raises(ConfigError) as info:
        CredentialStore(config).get("ghcr.io")
    assert "DOCKER_AUTH_CONFIG" in str(info.value)
    assert SECRET not in str(info.value)


# -- broken files ----------------------------------------------------------------------------


def test_broken_json_raises_config_error(config: Path) -> None:
    write_config(config, '{"auths": {"ghcr.io": {"auth": "' + b64(f"bob:{SECRET}") + '"')
    with pytest.raises(ConfigError) as info:
        CredentialStore(config).get("ghcr.io")
    message = str(info.value)
    assert str(config) in message and "invalid JSON" in message
    assert b64(f"bob:{SECRET}") not in message and SECRET not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        ([], "top level"),
        ({"auths": []}, "'auths'"),
        ({"auths": {"ghcr.io": "x"}}, "auths['ghcr.io']"),
        ({"auths": {"ghcr.io": {"auth": 5}}}, "auths['ghcr.io'].auth"),
        ({"auths": {"ghcr.io": {"identitytoken": ["t"]}}}, "identitytoken"),
        ({"credsStore": 1}, "credsStore"),
        ({"credHelpers": ["fake"]}, "credHelpers"),
        ({"credHelpers": {"ghcr.io": 1}}, "credHelpers"),
    ],
)
def test_wrong_shape_raises_config_error(config: Path, doc: Any, complaint: str) -> None:
    write_config(config, doc)
    with pytest.raises(ConfigError) as info:
        CredentialStore(config).get("ghcr.io")
    assert str(config) in str(info.value)
    assert complaint in str(info.value)


@pytest.mark.parametrize("auth", [b64("no-colon-secret"), "!!!" + SECRET, b64(":" + SECRET)])
def test_bad_auth_field(config: Path, auth: str) -> None:
    write_config(config, {"auths": {"ghcr.io": {"auth": auth}}})
    with pytest.raises(ConfigError) as info:
        CredentialStore(config).get("ghcr.io")
    assert "auths['ghcr.io'].auth" in str(info.value)
    assert auth not in str(info.value) and "secret" not in str(info.value)


def test_null_values_are_tolerated(config: Path) -> None:
    write_config(
        config, {"auths": {"ghcr.io": None, "quay.io": {"auth": None}}, "credsStore": None}
    )
    store = CredentialStore(config)
    assert store.get("ghcr.io").anonymous
    assert store.get("quay.io").anonymous


def test_unreadable_config(config: Path) -> None:
    config.mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot read"):
        CredentialStore(config).get("ghcr.io")


# -- credential helpers: get -----------------------------------------------------------------


def test_creds_store_get(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake", "auths": {"ghcr.io": {"auth": b64("file:pw")}}})
    helper.seed({"ghcr.io": ["bob", SECRET]})
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", SECRET)
    assert helper.calls() == [["get", "ghcr.io"]]


def test_helper_gets_docker_hub_key(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.seed({DOCKER_HUB_KEY: ["bob", "pw"]})
    assert CredentialStore(config).get("docker.io") == Credentials("bob", "pw")
    assert helper.calls() == [["get", DOCKER_HUB_KEY]]


def test_helper_identity_token(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.seed({"ghcr.io": ["<token>", TOKEN]})
    assert CredentialStore(config).get("ghcr.io") == Credentials(identity_token=TOKEN)


def test_cred_helpers_win_over_creds_store(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "missing", "credHelpers": {"ghcr.io": "fake"}})
    helper.seed({"ghcr.io": ["bob", "pw"]})
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", "pw")


def test_cred_helpers_key_matched_tolerantly(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credHelpers": {"https://ghcr.io": "fake"}})
    helper.seed({"ghcr.io": ["bob", "pw"]})
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", "pw")


def test_empty_cred_helper_opts_out_of_creds_store(config: Path, helper: FakeHelper) -> None:
    doc = {
        "credsStore": "fake",
        "credHelpers": {"ghcr.io": ""},
        "auths": {"ghcr.io": {"auth": b64("file:pw")}},
    }
    write_config(config, doc)
    assert CredentialStore(config).get("ghcr.io") == Credentials("file", "pw")
    assert helper.calls() == []


def test_helper_not_found_is_anonymous(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake", "auths": {"ghcr.io": {"auth": b64("file:pw")}}})
    # Like docker, a helper that has nothing does not fall back to the auths entry.
    assert CredentialStore(config).get("ghcr.io") == Credentials()


def test_missing_helper_binary(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "nosuch"})
    with pytest.raises(CredentialError) as info:
        CredentialStore(config).get("ghcr.io")
    assert str(info.value) == (
        "credential helper docker-credential-nosuch not found in PATH "
        f"(configured by credsStore in {config})"
    )
    assert info.value.exit_code == 3


def test_missing_helper_from_cred_helpers(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credHelpers": {"ghcr.io": "nosuch"}})
    with pytest.raises(CredentialError, match=r"configured by credHelpers\['ghcr.io'\]"):
        CredentialStore(config).get("ghcr.io")


def test_failing_helper_shows_stderr_not_stdout(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.mode("fail")
    with pytest.raises(CredentialError) as info:
        CredentialStore(config).get("ghcr.io")
    message = str(info.value)
    assert message == "credential helper docker-credential-fake get failed: keychain is locked"
    assert "stdout-secret-xyz" not in message and "second line" not in message


def test_helper_garbage_output(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.mode("garbage")
    with pytest.raises(CredentialError, match="invalid response") as info:
        CredentialStore(config).get("ghcr.io")
    assert "stdout-secret-xyz" not in str(info.value)


def test_helper_timeout(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.mode("sleep")
    with pytest.raises(CredentialError, match="timed out"):
        CredentialStore(config, helper_timeout=0.5).get("ghcr.io")


@pytest.mark.parametrize("name", ["../../bin/sh", "/bin/sh", "a b", ""])
def test_helper_names_cannot_be_paths(config: Path, helper: FakeHelper, name: str) -> None:
    write_config(config, {"credsStore": name})
    store = CredentialStore(config)
    if name:
        with pytest.raises(ConfigError, match="invalid credential helper"):
            store.get("quay.io")
    else:
        assert store.get("quay.io").anonymous


# -- credential helpers: store / erase -------------------------------------------------------


def test_helper_store_and_get(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    store = CredentialStore(config)
    store.store("docker.io", Credentials("bob", SECRET))
    assert helper.entries() == {DOCKER_HUB_KEY: ["bob", SECRET]}
    action, payload = helper.calls()[0]
    assert action == "store"
    assert json.loads(payload) == {"ServerURL": DOCKER_HUB_KEY, "Username": "bob", "Secret": SECRET}
    assert store.get("docker.io") == Credentials("bob", SECRET)
    # The plaintext file is not touched when a helper holds the secret.
    assert SECRET not in config.read_text()


def test_helper_store_identity_token(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credHelpers": {"ghcr.io": "fake"}})
    store = CredentialStore(config)
    store.store("ghcr.io", Credentials("bob", identity_token=TOKEN))
    assert helper.entries() == {"ghcr.io": ["<token>", TOKEN]}
    assert store.get("ghcr.io") == Credentials(identity_token=TOKEN)


def test_helper_store_failure_hides_secret(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.mode("echo")
    with pytest.raises(CredentialError) as info:
        CredentialStore(config).store("ghcr.io", Credentials("bob", SECRET))
    assert "store failed: cannot parse" in str(info.value)
    assert SECRET not in str(info.value)


def test_helper_cannot_store_registry_token(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    with pytest.raises(CredentialError, match="registry token"):
        CredentialStore(config).store("ghcr.io", Credentials(registry_token="rt"))


def test_helper_erase(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake", "auths": {"ghcr.io": {}, "quay.io": {}}})
    helper.seed({"ghcr.io": ["bob", "pw"]})
    store = CredentialStore(config)
    assert store.erase("ghcr.io") is True
    assert helper.entries() == {}
    assert json.loads(config.read_text())["auths"] == {"quay.io": {}}
    assert store.erase("ghcr.io") is False
    assert [call[0] for call in helper.calls()] == ["erase", "erase"]


def test_helper_erase_failure(config: Path, helper: FakeHelper) -> None:
    write_config(config, {"credsStore": "fake"})
    helper.mode("fail")
    with pytest.raises(CredentialError, match="erase failed: keychain is locked"):
        CredentialStore(config).erase("ghcr.io")


# -- file store ------------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_creates_private_directory_and_file(tmp_path: Path) -> None:
    config = tmp_path / "new" / "dir" / "config.json"
    CredentialStore(config).store("ghcr.io", Credentials("bob", SECRET))
    assert mode_of(config.parent) == 0o700
    assert mode_of(config) == 0o600
    assert json.loads(config.read_text()) == {"auths": {"ghcr.io": {"auth": b64(f"bob:{SECRET}")}}}
    assert CredentialStore(config).get("ghcr.io") == Credentials("bob", SECRET)


def test_store_preserves_other_fields_and_tightens_mode(config: Path) -> None:
    doc = {
        "auths": {
            "quay.io": {"auth": b64("q:pw")},
            DOCKER_HUB_KEY: {"auth": b64("old:pw"), "email": "bob@example.com"},
        },
        "credHelpers": {"gcr.io": "gcloud"},
        "psFormat": "table {{.ID}}",
        "proxies": {"default": {"httpProxy": "http://proxy:3128"}},
        "somethingNew": [1, 2.5, None, True],
    }
    write_config(config, doc)
    config.chmod(0o644)
    CredentialStore(config).store("docker.io", Credentials("bob", "new-pw"))
    assert mode_of(config) == 0o600
    saved = json.loads(config.read_text())
    expected = dict(doc)
    expected["auths"] = {
        "quay.io": {"auth": b64("q:pw")},
        DOCKER_HUB_KEY: {"email": "bob@example.com", "auth": b64("bob:new-pw")},
    }
    assert saved == expected
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_store_identity_and_registry_tokens(config: Path) -> None:
    store = CredentialStore(config)
    store.store("ghcr.io", Credentials("bob", identity_token=TOKEN))
    store.store("quay.io", Credentials(registry_token="rt"))
    auths = json.loads(config.read_text())["auths"]
    assert auths["ghcr.io"] == {"auth": b64("bob:"), "identitytoken": TOKEN}
    assert auths["quay.io"] == {"registrytoken": "rt"}
    assert store.get("ghcr.io") == Credentials("bob", identity_token=TOKEN)


def test_store_replaces_old_token_with_password(config: Path) -> None:
    write_config(config, {"auths": {"ghcr.io": {"identitytoken": TOKEN}}})
    CredentialStore(config).store("ghcr.io", Credentials("bob", "pw"))
    assert json.loads(config.read_text())["auths"]["ghcr.io"] == {"auth": b64("bob:pw")}


def test_store_anonymous_is_refused(config: Path) -> None:
    with pytest.raises(ValueError):
        CredentialStore(config).store("ghcr.io", Credentials())


def test_store_through_symlink(tmp_path: Path) -> None:
    real = write_config(tmp_path / "dotfiles" / "docker.json", {"psFormat": "x"})
    link = tmp_path / "docker" / "config.json"
    link.parent.mkdir()
    link.symlink_to(real)
    CredentialStore(link).store("ghcr.io", Credentials("bob", "pw"))
    assert link.is_symlink()
    assert json.loads(real.read_text())["auths"]["ghcr.io"] == {"auth": b64("bob:pw")}
    assert mode_of(real) == 0o600


def test_store_write_failure_leaves_old_file_and_no_temp(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(config, {"psFormat": "x"})
    before = config.read_bytes()

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(CredentialError, match=r"cannot write .*No space left") as info:
        CredentialStore(config).store("ghcr.io", Credentials("bob", SECRET))
    assert SECRET not in str(info.value)
    assert config.read_bytes() == before
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_erase_file_entries(config: Path) -> None:
    doc = {
        "auths": {
            "https://myreg.example:5000": {"auth": b64("a:pw")},
            "myreg.example:5000": {"auth": b64("b:pw")},
            "quay.io": {"auth": b64("q:pw")},
        },
        "psFormat": "x",
    }
    write_config(config, doc)
    config.chmod(0o644)
    store = CredentialStore(config)
    assert store.erase("myreg.example:5000") is True
    assert json.loads(config.read_text()) == {
        "auths": {"quay.io": {"auth": b64("q:pw")}},
        "psFormat": "x",
    }
    assert mode_of(config) == 0o600
    assert store.get("myreg.example:5000").anonymous
    assert store.erase("myreg.example:5000") is False
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_erase_without_file(config: Path) -> None:
    assert CredentialStore(config).erase("ghcr.io") is False
    assert not config.exists()
