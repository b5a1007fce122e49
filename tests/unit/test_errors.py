"""The error tree's declared fields: what each error carries, and that it survives pickling."""

from __future__ import annotations

import pickle

import orjson
import pytest

from fastpull import errors
from fastpull.errors import (
    MAX_ERROR_BODY,
    BatchFailed,
    ConnectionFailed,
    Diagnostic,
    DigestMismatch,
    FastpullError,
    Interrupted,
    NoSuchImage,
    NotFound,
    ProtocolError,
    RegistryError,
    ResponseTooLarge,
    StoreDamaged,
    StoreError,
    TooManyRequests,
    parse_diagnostics,
)
from fastpull.registry.transport import Response, http_error


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


# One instance of every error that declares fields, each field set to a value of its own.
WITH_FIELDS: list[FastpullError] = [
    RegistryError(
        "r", host="h:5000", status=404, diagnostics=(Diagnostic("MANIFEST_UNKNOWN", "gone"),)
    ),
    NotFound("n", host="h", status=404),
    TooManyRequests("t", host="h", status=429),
    ConnectionFailed("c", host="h:1"),
    ProtocolError("p", status=400),
    ResponseTooLarge("big", limit=4096, host="h"),
    DigestMismatch("d", expected="sha256:aa", actual="sha256:bb", expected_size=10, actual_size=9),
    StoreError("s", store="/srv/store", errno=28),
    StoreDamaged("sd", store="/srv/store"),
    NoSuchImage("no such image"),
    BatchFailed("b", exit_code=4),
    Interrupted("i", exit_code=143),
]


@pytest.mark.parametrize("error", WITH_FIELDS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(error: FastpullError) -> None:
    error.add_note("a note survives too")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    assert copy.exit_code == error.exit_code


def test_every_error_class_pickles_with_only_a_message() -> None:
    simple = [
        cls for cls in _subclasses(FastpullError) if cls not in (DigestMismatch, ResponseTooLarge)
    ]
    assert len(simple) > 15
    for cls in [FastpullError, *simple]:
        copy = pickle.loads(pickle.dumps(cls("why")))
        assert type(copy) is cls and str(copy) == "why"


def test_fields_are_declared_not_free_form() -> None:
    with pytest.raises(TypeError):
        StoreError("s", actual_size=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        DigestMismatch("no digest named")  # type: ignore[call-arg]
    assert StoreError("s").store is None and StoreError("s").errno is None
    assert RegistryError("r").diagnostics == ()


def test_an_exit_code_given_to_one_error_stays_with_it() -> None:
    assert Interrupted("i", exit_code=143).exit_code == 143
    assert Interrupted("i").exit_code == 130 == Interrupted.exit_code
    assert BatchFailed("b", exit_code=4).exit_code == 4
    assert BatchFailed.exit_code == 1


def _body(*entries: object) -> bytes:
    return orjson.dumps({"errors": list(entries)})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            _body({"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {}}),
            (Diagnostic("MANIFEST_UNKNOWN", "manifest unknown"),),
        ),
        (_body({"code": "DENIED"}), (Diagnostic("DENIED", ""),)),
        (_body("text", {"message": " padded "}), (Diagnostic("", "padded"),)),
        (
            _body(*({"code": f"C{i}"} for i in range(9))),
            tuple(Diagnostic(f"C{i}", "") for i in range(4)),
        ),
        (_body({"code": "X" * 500, "message": "m" * 5000}), (Diagnostic("X" * 60, "m" * 200),)),
        (b"", ()),
        (b"<html>502 Bad Gateway</html>", ()),
        (b'{"errors": "none"}', ()),
        (b"[1, 2]", ()),
        # A valid body cut at the cap is no longer JSON: nothing is read past it.
        (_body({"code": "LATE", "message": "x" * MAX_ERROR_BODY}), ()),
    ],
    ids=[
        "spec",
        "code-only",
        "non-objects-skipped",
        "at-most-four",
        "long-cut",
        "empty",
        "html",
        "errors-not-a-list",
        "not-an-object",
        "over-the-cap",
    ],
)
def test_parse_diagnostics(body: bytes, expected: tuple[Diagnostic, ...]) -> None:
    assert parse_diagnostics(body) == expected


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 503])
def test_http_errors_keep_the_status_and_the_registry_codes(status: int) -> None:
    body = _body({"code": "NAME_UNKNOWN", "message": "repository name not known"})
    err = http_error(Response(status, (), body, "https://u:pw@r.example:5000/v2/x"), "x")
    assert isinstance(err, RegistryError)
    assert err.status == status
    assert err.host == "r.example:5000"
    assert err.diagnostics == (Diagnostic("NAME_UNKNOWN", "repository name not known"),)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.status, copy.diagnostics, copy.host) == (err.status, err.diagnostics, err.host)


def test_the_module_docstring_names_every_field() -> None:
    doc = errors.__doc__ or ""
    for error in WITH_FIELDS:
        for field in vars(error):
            if field not in ("message", "__notes__"):
                assert f"``{field}``" in doc, field
