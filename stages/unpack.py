"""Unpack one dataset's verified archives, safely and all-or-nothing: ``data.<dataset>.expect``.

    python -m stages.unpack coco --archives data/downloads/coco --out data/coco

Every archive in ``--archives`` (zip, tar, tar.gz/bz2/xz; in file-name order) is extracted into
ONE temporary directory beside ``--out``, which replaces ``--out`` with a single rename once all
archives are in and every path of ``data.<dataset>.expect`` exists. So a failure (unsafe entry,
archive bomb, corrupt archive, missing layout) leaves no half-unpacked dataset behind.

Safety: no entry may land outside the destination (``..``, absolute names, links pointing out);
the total uncompressed size is capped both by the sizes the archive declares (checked before
writing) and by the bytes actually written (counted while writing); so is the number of entries.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pydantic import Field

from stages.common import StageError, atomic_path, main_guard
from stages.config import Section, load_branch, load_section
from stages.download import Dataset

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COPY_CHUNK = 1 << 20
# What a corrupt or truncated archive raises from zipfile/tarfile/gzip/zlib/bz2/lzma.
CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError,
           RuntimeError)


class UnpackParams(Section):
    """params.yaml ``unpack``: limits against archive bombs (per dataset, all archives)."""

    max_total_bytes: int = Field(gt=0)
    max_members: int = Field(gt=0)


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


def write_capped(src: BinaryIO, target: Path, budget: Budget, archive: Path, member: str) -> None:
    """Copy ``src`` to a new file ``target``, counting every byte against the budget."""
    if target.is_symlink() or target.exists():
        target.unlink()  # an earlier archive's file (or link): replace it, never write through
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        for block in iter(lambda: src.read(COPY_CHUNK), b""):
            budget.wrote(archive, member, len(block))
            out.write(block)


def _inside(dest: Path, target: Path) -> bool:
    root = os.path.realpath(dest)
    return os.path.commonpath([root, os.path.realpath(target)]) == root


def zip_target(dest: Path, info: zipfile.ZipInfo, archive: Path) -> Path:
    """Where a zip entry goes; StageError for absolute names, '..' and symlink entries.

    zipfile's own extract() silently rewrites such names instead of refusing them, and it
    cannot cap sizes, so this check and the copy loop are ours.
    """
    name = info.filename.replace("\\", "/")
    pure = PurePosixPath(name)
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise StageError(f"{archive}: unsafe entry {info.filename!r}: absolute path")
    if ".." in pure.parts:
        raise StageError(f"{archive}: unsafe entry {info.filename!r}: '..' leads outside")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise StageError(f"{archive}: unsafe entry {info.filename!r}: symlink entries in zip "
                         "archives are not extracted")
    target = dest.joinpath(*pure.parts)
    if not _inside(dest, target):
        raise StageError(f"{archive}: unsafe entry {info.filename!r}: resolves outside")
    return target


def extract_zip(archive: Path, dest: Path, budget: Budget) -> None:
    """Extract a zip into ``dest``; sizes are checked from the central directory first."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        budget.declare(archive, sum(i.file_size for i in infos), len(infos))
        for info in infos:
            target = zip_target(dest, info, archive)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                write_capped(src, target, budget, archive, info.filename)


class _HeaderRecorder(tarfile.TarInfo):
    """TarInfo that remembers the last header block tarfile parsed (see extract_tar)."""

    last_block = b""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        cls.last_block = buf
        return super().frombuf(buf, encoding, errors)


def extract_tar(archive: Path, dest: Path, budget: Budget) -> None:
    """Extract a (compressed) tar into ``dest`` through tarfile's ``data`` filter.

    The ``data`` filter (Python 3.11.4+; we run 3.11.7) refuses '..', links pointing outside,
    absolute link targets and device files, and drops setuid bits and ownership. It strips a
    leading '/' instead of refusing: we refuse absolute names ourselves. Regular files are
    copied through ``write_capped`` so written bytes are counted; tar has no index, so declared
    sizes are checked entry by entry, before each entry's bytes are written.
    """
    # tarfile ends its iteration quietly at a truncated or garbled header after the first entry;
    # a complete tar has a zero block there. The header block it stopped at is recorded through
    # TarFile's documented ``tarinfo`` class hook (peeking by seeking back would rewind and
    # re-decompress a whole .tar.gz).
    recorder = type("Recorder", (_HeaderRecorder,), {})  # own class state per archive
    with tarfile.open(archive, "r:*", tarinfo=recorder) as tf:
        for member in tf:
            budget.declare(archive, max(member.size, 0) if member.isreg() else 0, 1)
            if member.name.startswith("/"):
                raise StageError(f"{archive}: unsafe entry {member.name!r}: absolute path")
            try:
                safe = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise StageError(f"{archive}: unsafe entry {member.name!r}: {exc}") from None
            if safe.isreg():
                target = dest / safe.name
                with tf.extractfile(safe) as src:
                    write_capped(src, target, budget, archive, safe.name)
                os.chmod(target, safe.mode)
            else:  # directories, symlinks and hard links, already vetted by the filter
                tf.extract(safe, dest, filter="data")
        if recorder.last_block != tarfile.NUL * tarfile.BLOCKSIZE:
            raise StageError(f"{archive}: truncated or corrupt tar archive (no end-of-archive "
                             f"marker at byte {tf.offset})")


def extract_archive(archive: Path, dest: Path, budget: Budget) -> None:
    """Extract one archive by its suffix; damage becomes a StageError naming the archive."""
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            extract_zip(archive, dest, budget)
        elif name.endswith(TAR_SUFFIXES):
            extract_tar(archive, dest, budget)
        else:
            raise StageError(f"{archive}: unknown archive type; supported: .zip, "
                             f"{', '.join(TAR_SUFFIXES)}")
    except StageError:
        raise
    except CORRUPT as exc:  # (StageError is a RuntimeError too: it is let through above)
        raise StageError(f"{archive}: corrupt or truncated archive: {exc}") from None
    except OSError as exc:
        raise StageError(f"{archive}: extraction failed: {exc}") from None


def missing_paths(root: Path, expect: list[str]) -> list[str]:
    """Entries of ``expect`` (relative paths or glob patterns) that match nothing under root."""
    return [p for p in expect if next(iter(root.glob(p)), None) is None]


def list_archives(archives_dir: Path) -> list[Path]:
    """The archive files of a download directory, in name order (the extraction order)."""
    if not archives_dir.is_dir():
        raise StageError(f"{archives_dir}: archive directory does not exist")
    archives = sorted(p for p in archives_dir.iterdir() if p.is_file() and
                      not p.name.startswith("."))
    if not archives:
        raise StageError(f"{archives_dir}: no archives to unpack")
    return archives


def remove_leftovers(out: Path) -> None:
    """Temp dirs of an earlier run killed mid-extraction (atomic_path names them ``.name.*.tmp``)."""
    for leftover in out.parent.glob(f".{out.name}.*.tmp"):
        log.info("removing leftover %s", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def unpack_dataset(archives: list[Path], out: Path, expect: list[str], params: UnpackParams,
                   expect_key: str = "expect") -> None:
    """Extract ``archives`` into a temp dir beside ``out``, check ``expect``, rename into place."""
    remove_leftovers(out)
    budget = Budget(params.max_total_bytes, params.max_members)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for archive in archives:
            log.info("extracting %s", archive)
            extract_archive(archive, tmp, budget)
        missing = missing_paths(tmp, expect)
        if missing:
            raise StageError(f"{out}: after unpacking {', '.join(a.name for a in archives)} "
                             f"these expected paths are missing: {', '.join(missing)} "
                             f"(params {expect_key}); nothing was put in place")
    log.info("%s: %d entries, %d bytes from %d archive(s)", out, budget.members, budget.written,
             len(archives))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="key under params `data` (e.g. coco, voc)")
    parser.add_argument("--archives", required=True, type=Path,
                        help="directory of verified archives (the download stage's output)")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    args = parser.parse_args(argv)
    dataset = load_branch("data", args.dataset, Dataset)
    params = load_section("unpack", UnpackParams)
    unpack_dataset(list_archives(args.archives), args.out, dataset.expect, params,
                   expect_key=f"data.{args.dataset}.expect")
    return 0


if __name__ == "__main__":
    main_guard(main)
