"""Tar as image archives use it: deterministic headers to write, and a reader that trusts nothing.

Writing: every member is a regular file, mode 0644, mtime 0, uid/gid 0, no user or group
names, so the same content always gives the same bytes. Python's PAX writer adds an extended
header only when the ustar fields cannot hold a value (a size of 8 GiB or more), which Go's
archive/tar (docker, containerd, skopeo, podman) reads.

Reading (:class:`TarReader`) works on a stream, once, and refuses anything it does not need
before acting on it: names that are absolute or climb out with ``..``, devices, FIFOs and
sparse files, PAX or GNU long-name records over :data:`MAX_RECORD` bytes (their payload is
held in memory), headers with a bad checksum (also what data running past its header's size
looks like) and data cut short. Links are reported, never followed: the caller decides.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from fastpull.errors import ArchiveError

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
# Payload of one PAX extended header or GNU long name/link record.
MAX_RECORD = 1 << 20

FILE = "file"
DIRECTORY = "directory"
SYMLINK = "symlink"
HARDLINK = "hardlink"

_KINDS = {
    tarfile.REGTYPE: FILE,
    tarfile.AREGTYPE: FILE,
    tarfile.CONTTYPE: FILE,
    tarfile.DIRTYPE: DIRECTORY,
    tarfile.SYMTYPE: SYMLINK,
    tarfile.LNKTYPE: HARDLINK,
}
# Headers that only carry metadata for the member after them.
_RECORDS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_NAMES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


def member_header(name: str, size: int) -> bytes:
    """The header of a regular file member ``name`` of ``size`` bytes (data and
    :func:`padding` follow it)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size: int) -> bytes:
    """The zero bytes that round a member's data of ``size`` bytes up to whole blocks."""
    return bytes(-size % BLOCK)


def safe_name(name: str, what: str = "member") -> str:
    """``name`` as a relative path inside the archive (``./a//b/`` → ``a/b``); ArchiveError
    for an absolute name, a ``..`` component, a NUL or nothing at all."""
    shown = repr(name[:200])
    if "\0" in name or name.startswith("/"):
        raise ArchiveError(f"archive {what} {shown} is not a relative path inside the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive {what} {shown} points outside the archive (..)")
    if not parts:
        raise ArchiveError(f"archive {what} has an empty name")
    return "/".join(parts)


def link_target(member: str, link: str, kind: str) -> str:
    """The member a link names: a hard link names it from the archive's root, a symbolic
    link relative to its own directory. ArchiveError if that leaves the archive."""
    if kind == SYMLINK and not link.startswith("/"):
        joined = posixpath.join(posixpath.dirname(member), link)
        # normpath resolves "a/../b" textually; a leading ".." survives it and is refused.
        return safe_name(posixpath.normpath(joined), f"link {member!r} target")
    return safe_name(link, f"link {member!r} target")


@dataclass(frozen=True)
class Member:
    """One archive entry: its safe name, what it is, its data size, and a link's target."""

    name: str
    kind: str
    size: int
    link: str = ""


class TarReader:
    """Reads members one by one from a stream; each member's data must be read (or is
    skipped) before the next header.

    ::

        reader = TarReader(stream)
        for member in reader.members():
            for chunk in reader.data():
                ...
    """

    def __init__(self, stream: BinaryIO, chunk_size: int = 1 << 20) -> None:
        self._stream = stream
        self._chunk = chunk_size
        self._left = 0  # data bytes of the current member not read yet
        self._pad = 0
        self.offset = 0

    def _read(self, n: int, what: str) -> bytes:
        parts = []
        wanted = n
        while wanted:
            piece = self._stream.read(min(wanted, self._chunk))
            if not piece:
                raise ArchiveError(
                    f"archive is truncated: {what} ends after {n - wanted} of {n} bytes"
                )
            parts.append(piece)
            wanted -= len(piece)
        self.offset += n
        return b"".join(parts)

    def data(self) -> Iterator[bytes]:
        """The current member's data, in pieces of at most ``chunk_size`` bytes."""
        while self._left:
            piece = self._stream.read(min(self._left, self._chunk))
            if not piece:
                raise ArchiveError(
                    f"archive is truncated: a member's data ends early (at byte {self.offset})"
                )
            self._left -= len(piece)
            self.offset += len(piece)
            yield piece
        if self._pad:
            self._read(self._pad, "padding")
            self._pad = 0

    def members(self) -> Iterator[Member]:
        """Every member, in archive order, up to the end-of-archive marker (or the end of
        a stream that stops cleanly between members)."""
        while True:
            for _ in self.data():
                pass
            overrides: dict[str, str] = {}
            while True:
                block = self._stream.read(BLOCK)
                while block and len(block) < BLOCK:
                    more = self._stream.read(BLOCK - len(block))
                    if not more:
                        break
                    block += more
                if not block:
                    return  # no end marker: tolerated, as by docker and Python
                if len(block) < BLOCK:
                    raise ArchiveError(
                        f"archive is truncated: a header ends early (at byte {self.offset})"
                    )
                self.offset += BLOCK
                if block == bytes(BLOCK):
                    return
                info = self._header(block)
                if info.type in _RECORDS:
                    payload = self._record(info.size)
                    if info.type == tarfile.XHDTYPE:
                        overrides.update(_pax_records(payload))
                    elif info.type == tarfile.GNUTYPE_LONGNAME:
                        overrides["path"] = _text(payload.split(b"\0", 1)[0])
                    elif info.type == tarfile.GNUTYPE_LONGLINK:
                        overrides["linkpath"] = _text(payload.split(b"\0", 1)[0])
                    continue  # global PAX records say nothing a reader here needs
                break
            yield self._member(info, overrides)

    def _header(self, block: bytes) -> tarfile.TarInfo:
        try:
            return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ArchiveError(
                f"archive has an invalid tar header at byte {self.offset - BLOCK} ({exc}); "
                "a member's data may be longer than its header says"
            ) from None

    def _record(self, size: int) -> bytes:
        if size > MAX_RECORD:
            raise ArchiveError(f"archive has a {size}-byte extended header; refused")
        payload = self._read(size, "an extended header")
        self._read(-size % BLOCK, "padding")
        return payload

    def _member(self, info: tarfile.TarInfo, overrides: dict[str, str]) -> Member:
        raw_name = overrides.get("path", info.name)
        kind = _KINDS.get(info.type)
        if kind is None:
            what = _NAMES.get(info.type, f"of tar type {info.type!r}")
            raise ArchiveError(f"archive member {raw_name[:200]!r} is {what}; refused")
        size = info.size
        if "size" in overrides:
            text = overrides["size"]
            if not text.isascii() or not text.isdigit():
                raise ArchiveError(f"archive member {raw_name[:200]!r} has a bad size")
            size = int(text)
        if size < 0:
            raise ArchiveError(f"archive member {raw_name[:200]!r} has a negative size")
        name = safe_name(raw_name)
        if kind != FILE:
            size = 0 if kind != DIRECTORY else size
        self._left = size if kind in (FILE, DIRECTORY) else 0
        self._pad = -self._left % BLOCK
        link = overrides.get("linkpath", info.linkname) if kind in (SYMLINK, HARDLINK) else ""
        return Member(name, kind, size, link)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records; ArchiveError if they do not add up."""
    found: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        length_text = payload[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise ArchiveError("archive has a malformed PAX extended header")
        end = pos + int(length_text)
        record = payload[space + 1 : end]
        if end > len(payload) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("archive has a malformed PAX extended header")
        key, _, value = record[:-1].partition(b"=")
        found[_text(key)] = _text(value)
        pos = end
    return found


__all__ = [
    "BLOCK",
    "DIRECTORY",
    "END_OF_ARCHIVE",
    "FILE",
    "HARDLINK",
    "MAX_RECORD",
    "SYMLINK",
    "Member",
    "TarReader",
    "link_target",
    "member_header",
    "padding",
    "safe_name",
]
