"""Safe extraction of zip and tar archives: regular files and directories only, all checked
before anything is written, every file created by us without following a link.

It does not rely on ``tarfile``'s extraction filters (several CPython releases this stack runs
on have known bypasses of the ``data`` filter, CVE-2025-4517 and others) nor on
``zipfile.extract``, which rewrites unsafe names instead of refusing them:

1. Plan: a first pass over every archive's member headers (a tar is read twice; a zip's
   central directory is its index). Any member that is not a regular file or a directory
   (symlink, hard link, device, FIFO, ...), any name that is absolute, holds '..', is too
   long or clashes with another member's kind, and any archive whose declared sizes or member
   count exceed the budget is refused with one message naming the member, before any write.
2. Write (``stages.safe_writer``): directories with ``mkdir`` and files with ``O_CREAT |
   O_EXCL | O_NOFOLLOW``, each opened relative to its parent directory's descriptor (opened
   with ``O_NOFOLLOW``), so no link is ever followed; every created path is checked to resolve
   inside the destination, and the bytes really written are counted against the size cap
   (declared sizes can lie).
"""
from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import StageError
from stages.data_params import TAR_SUFFIXES, ZIP_SUFFIXES
from stages.outputs import MARKER
from stages.safe_writer import Writer

MAX_NAME_BYTES = 255     # one path component (Linux NAME_MAX)
MAX_PATH_BYTES = 4000    # a whole member path (below Linux PATH_MAX with the destination)
# What a corrupt or truncated archive raises from zipfile/tarfile/gzip/zlib/bz2/lzma.
CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError,
           RuntimeError)
TAR_TYPES = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link",
             tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
             tarfile.FIFOTYPE: "a FIFO"}
MODE_TYPES = {stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


@dataclass
class Budget:
    """Running totals of one dataset's extraction against the caps in ``unpack``."""

    max_bytes: int
    max_members: int
    declared: int = 0
    written: int = 0
    members: int = 0

    def declare(self, archive: Path, size: int, members: int = 0) -> None:
        """Account for sizes/entries an archive announces, before any of it is written."""
        self.declared += size
        self.members += members
        if self.declared > self.max_bytes:
            raise StageError(f"{archive}: declares more than unpack.max_total_bytes = "
                             f"{self.max_bytes} uncompressed bytes ({self.declared}); "
                             "refusing a possible archive bomb")
        if self.members > self.max_members:
            raise StageError(f"{archive}: more than unpack.max_members = {self.max_members} "
                             f"entries ({self.members}); refusing a possible archive bomb")

    def wrote(self, archive: Path, member: str, size: int) -> None:
        """Account for bytes really written (catches archives whose declared sizes lie)."""
        self.written += size
        if self.written > self.max_bytes:
            raise StageError(f"{archive}: {member!r} takes the output past unpack.max_total_bytes"
                             f" = {self.max_bytes} bytes; refusing a possible archive bomb")


@dataclass(frozen=True)
class Member:
    """One archive member to extract: its name in the archive and where it goes."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int


@dataclass
class Plan:
    """Every member of a dataset's archives, checked; the kinds of the paths they create."""

    archives: list[tuple[Path, list[Member]]] = field(default_factory=list)
    kinds: dict[tuple[str, ...], str] = field(default_factory=dict)

    def add(self, archive: Path, member: Member) -> None:
        """Record a member; refuse one whose path is a file and a directory at once."""
        for i in range(1, len(member.parts)):
            if self.kinds.setdefault(member.parts[:i], "dir") != "dir":
                unsafe(archive, member.name, f"'{'/'.join(member.parts[:i])}' is a file "
                       "of this dataset, not a directory")
        kind = "dir" if member.is_dir else "file"
        if self.kinds.setdefault(member.parts, kind) != kind:
            unsafe(archive, member.name, f"a {kind} where another member made a "
                   f"{self.kinds[member.parts]}")


def unsafe(archive: Path, name: str, why: str) -> None:
    raise StageError(f"{archive}: unsafe entry {name!r}: {why}; nothing was extracted")


def member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of a member name; StageError for absolute, '..' or too long."""
    path = name.replace("\\", "/")
    if "\0" in path:
        unsafe(archive, name, "NUL in its name")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        unsafe(archive, name, "absolute path")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        unsafe(archive, name, "'..' leads outside the destination")
    encoded = [p.encode("utf-8", "surrogateescape") for p in parts]
    if any(len(p) > MAX_NAME_BYTES for p in encoded) or \
            sum(len(p) + 1 for p in encoded) > MAX_PATH_BYTES:
        unsafe(archive, name, f"name too long (more than {MAX_NAME_BYTES} bytes per component "
               f"or {MAX_PATH_BYTES} in all)")
    if parts[:1] == (MARKER,):
        unsafe(archive, name, f"{MARKER} is the stages' own marker file")
    return parts


class _HeaderRecorder(tarfile.TarInfo):
    """TarInfo that remembers the last header block tarfile parsed (see plan_tar)."""

    last_block = b""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        cls.last_block = buf
        return super().frombuf(buf, encoding, errors)


def plan_tar(archive: Path, plan: Plan, budget: Budget) -> None:
    """First pass over a tar's headers: check every member (see the module docstring)."""
    # tarfile ends its iteration quietly at a truncated or garbled header after the first entry;
    # a complete tar has a zero block there. The header block it stopped at is recorded through
    # TarFile's documented ``tarinfo`` class hook.
    recorder = type("Recorder", (_HeaderRecorder,), {})  # own class state per archive
    members = []
    with tarfile.open(archive, "r:*", tarinfo=recorder) as tf:
        for info in tf:
            if not (info.isreg() or info.isdir()):
                kind = TAR_TYPES.get(info.type, f"of unsupported type {info.type!r}")
                target = f" to {info.linkname!r}" if info.issym() or info.islnk() else ""
                unsafe(archive, info.name, f"{kind}{target}; only regular files and "
                       "directories are extracted")
            budget.declare(archive, max(info.size, 0) if info.isreg() else 0, 1)
            members.append(Member(info.name, member_parts(archive, info.name), info.isdir(),
                                  info.size if info.isreg() else 0))
        if recorder.last_block != tarfile.NUL * tarfile.BLOCKSIZE:
            raise StageError(f"{archive}: truncated or corrupt tar archive (no end-of-archive "
                             f"marker at byte {tf.offset})")
    _add(plan, archive, members)


def plan_zip(archive: Path, plan: Plan, budget: Budget) -> None:
    """Check every member of a zip from its central directory (see the module docstring)."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    budget.declare(archive, sum(i.file_size for i in infos), len(infos))
    members = []
    for info in infos:
        mode = stat.S_IFMT(info.external_attr >> 16)
        if mode in MODE_TYPES:
            unsafe(archive, info.filename, f"{MODE_TYPES[mode]}; only regular files and "
                   "directories are extracted")
        is_dir = info.filename.endswith("/") or mode == stat.S_IFDIR
        if is_dir and info.file_size:
            unsafe(archive, info.filename, "a directory entry with data")
        members.append(Member(info.filename, member_parts(archive, info.filename), is_dir,
                              info.file_size))
    _add(plan, archive, members)


def _add(plan: Plan, archive: Path, members: list[Member]) -> None:
    for member in members:
        if not member.parts and not member.is_dir:
            unsafe(archive, member.name, "a file without a name")
        if member.parts:
            plan.add(archive, member)
    plan.archives.append((archive, members))


def write_archive(archive: Path, members: list[Member], writer: Writer, budget: Budget) -> None:
    """Second pass: write the planned members of one archive (the same members, in order)."""
    if archive.name.lower().endswith(ZIP_SUFFIXES):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _same_members(archive, members, [i.filename for i in infos])
            for info, member in zip(infos, members):
                if member.is_dir:
                    writer.make_dir(member)
                else:
                    with zf.open(info) as src:
                        writer.write_file(member, src, budget, archive)
        return
    with tarfile.open(archive, "r:*") as tf:
        for info, member in _iter_same(archive, tf, members):  # streaming: one forward read
            if member.is_dir:
                writer.make_dir(member)
            else:
                with tf.extractfile(info) as src:
                    writer.write_file(member, src, budget, archive)


def _iter_same(archive: Path, tf: tarfile.TarFile, members: list[Member]):
    """Pair the tar's members (second read) with the plan; refuse if they differ."""
    seen = 0
    for info in tf:
        if seen >= len(members) or info.name != members[seen].name or \
                not (info.isreg() or info.isdir()):
            raise StageError(f"{archive}: changed while being extracted (member {info.name!r})")
        yield info, members[seen]
        seen += 1
    if seen != len(members):
        raise StageError(f"{archive}: changed while being extracted ({seen} members)")


def _same_members(archive: Path, members: list[Member], names: list[str]) -> None:
    if names != [m.name for m in members]:
        raise StageError(f"{archive}: changed while being extracted")


def extract_archives(archives: list[Path], dest: Path, budget: Budget) -> None:
    """Extract ``archives`` (in order) into the existing empty directory ``dest``.

    Every member of every archive is checked first; damage becomes a StageError naming the
    archive. On any error the caller discards ``dest`` (nothing outside it is ever written).
    """
    plan = Plan()
    for archive in archives:
        _guard(archive, lambda a=archive: _plan_one(a, plan, budget))
    writer = Writer(dest)
    try:
        for archive, members in plan.archives:
            _guard(archive, lambda a=archive, m=members: write_archive(a, m, writer, budget))
    finally:
        writer.close()


def _plan_one(archive: Path, plan: Plan, budget: Budget) -> None:
    name = archive.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        plan_zip(archive, plan, budget)
    elif name.endswith(TAR_SUFFIXES):
        plan_tar(archive, plan, budget)
    else:
        raise StageError(f"{archive}: unknown archive type; supported: "
                         f"{', '.join(ZIP_SUFFIXES + TAR_SUFFIXES)}")


def _guard(archive: Path, step) -> None:
    """Run ``step``; turn a damaged archive or a failed write into a StageError naming it."""
    try:
        step()
    except StageError:
        raise
    except CORRUPT as exc:  # (StageError is a RuntimeError too: it is let through above)
        raise StageError(f"{archive}: corrupt or truncated archive: {exc}") from None
    except OSError as exc:
        raise StageError(f"{archive}: extraction failed: {exc}") from None
