"""One archive's partial download: its file, the digests of its bytes, and its limits.

The partial file is only ever opened with ``O_NOFOLLOW`` (a symlink planted in its place is
not written through), its digests always cover exactly the bytes on disk, and every block is
checked against the archive's size bound and deadline before it is written.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import StageError
from stages.data_params import Archive

_OPEN_PARTIAL = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """How patient and how generous a download is (params.yaml ``download``)."""

    timeout_s: float      # connect timeout, and longest wait for the next bytes
    retries: int          # failed attempts tolerated in a row (without progress)
    backoff_s: float      # wait before the first retry; doubles each retry ...
    backoff_max_s: float  # ... up to this
    chunk_bytes: int      # largest read/write/hash block
    deadline_s: float     # the whole archive, all attempts and waits included
    max_bytes: int        # largest archive accepted


@dataclass
class Digests:
    """md5 and sha1 of the bytes fed so far (both published checksums are checked)."""

    # Integrity checks, not security: allowed on FIPS-restricted Pythons too.
    md5: "hashlib._Hash" = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    sha1: "hashlib._Hash" = field(default_factory=lambda: hashlib.sha1(usedforsecurity=False))
    size: int = 0

    def update(self, data: bytes) -> None:
        self.md5.update(data)
        self.sha1.update(data)
        self.size += len(data)

    @classmethod
    def of_file(cls, path: Path, chunk: int) -> "Digests":
        """Digests of a whole file (an existing archive, or the partial file we resume)."""
        digests = cls()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digests.update(block)
        return digests

    def mismatches(self, archive: Archive) -> list[str]:
        """``'md5 expected X, got Y'`` for each checksum that differs from the published one."""
        got = {"md5": self.md5.hexdigest(), "sha1": self.sha1.hexdigest()}
        return [f"{algo} expected {getattr(archive, algo)}, got {got[algo]}"
                for algo in ("md5", "sha1") if got[algo] != getattr(archive, algo)]


@dataclass
class Transfer:
    """One archive's partial file, the digests of its bytes, and the limits it runs under."""

    path: Path
    name: str
    limits: Limits
    digests: Digests = field(default_factory=Digests)
    started: float = field(default_factory=time.monotonic)

    def resume_offset(self) -> int:
        """Bytes already on disk; makes sure the digests cover exactly those bytes."""
        size = self.path.lstat().st_size if os.path.lexists(self.path) else 0
        if self.digests.size != size:  # a rerun found a partial file: hash what it holds first
            self.digests = Digests.of_file(self.path, self.limits.chunk_bytes) if size \
                else Digests()
        return size

    def truncate(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digests = Digests()

    def open(self, append: bool):
        """The partial file for writing (never through a symlink)."""
        flags = _OPEN_PARTIAL | (os.O_APPEND if append else os.O_TRUNC)
        return os.fdopen(os.open(self.path, flags, 0o644), "ab" if append else "wb")

    def remaining_s(self) -> float:
        return self.limits.deadline_s - (time.monotonic() - self.started)

    def check_deadline(self) -> None:
        if self.remaining_s() <= 0:
            raise StageError(f"{self.name}: not complete after download.deadline_s = "
                             f"{self.limits.deadline_s:g} s ({self.digests.size} bytes so far, "
                             "kept for a later resume); giving up")

    def add(self, block: bytes, out, bar) -> None:
        """Write and hash one block; refuse a body that grows past max_bytes."""
        if self.digests.size + len(block) > self.limits.max_bytes:
            raise TooLarge()
        out.write(block)
        self.digests.update(block)
        bar.update(len(block))


class TooLarge(Exception):
    """A block would take the archive past ``max_bytes``."""


def too_large(transfer: Transfer, what: str) -> StageError:
    """Remove the partial file (it cannot be the archive) and say why."""
    transfer.truncate()
    return StageError(f"{transfer.name}: {what} more than download.max_bytes = "
                      f"{transfer.limits.max_bytes} bytes; refused (partial file removed)")
