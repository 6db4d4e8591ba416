"""Property: whatever the archive, extraction either succeeds with everything inside its
destination or refuses, and never changes anything outside it.

Random tar and zip archives are built from a small alphabet of member types (regular files,
directories, symlinks, hard links, devices, FIFOs; zip symlink and FIFO entries) and names
(nested, '..', absolute, '.'-padded, long, duplicates, a link and then a file through it).
A sentinel tree beside the destination (files, a directory, a symlink) is snapshotted before
and compared after: contents, modes and mtimes. Derandomized and bounded, so CI is stable.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.common import StageError
from stages.extract import Budget, extract_archives

NAMES = ["a", "b", "a/b", "a/b/c", "d/", "./a", "a//b", "..", "../x", "a/../../x", "../outside/f",
         "/abs", "/tmp/x", "a/./b/../../..", "x" * 120, "y" * 300, "sub/" + "z" * 200,
         "link", "link/x", "hard", "outside", "./", "."]
TARGETS = ["a", "a/b", "..", "../outside", "../outside/f", "/", "/etc/passwd", ".", "link",
           "x" * 120 + "/../..", "../" * 20]
TAR_KINDS = ["file", "file", "dir", "symlink", "hardlink", "chr", "blk", "fifo"]
ZIP_KINDS = ["file", "file", "dir", "symlink", "fifo"]

member = st.tuples(st.sampled_from(NAMES), st.sampled_from(TARGETS), st.binary(max_size=64))
tar_members = st.lists(st.tuples(st.sampled_from(TAR_KINDS), member), min_size=1, max_size=8)
zip_members = st.lists(st.tuples(st.sampled_from(ZIP_KINDS), member), min_size=1, max_size=8)
SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def build_tar(path: Path, members) -> None:
    types = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
             "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE, "dir": tarfile.DIRTYPE}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for kind, (name, target, data) in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o4777 if kind == "file" else 0o755  # setuid bits must not survive
            if kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = types[kind]
            info.linkname = target if kind in ("symlink", "hardlink") else ""
            tf.addfile(info)


def build_zip(path: Path, members) -> None:
    modes = {"file": 0o100644, "dir": 0o040755, "symlink": 0o120777, "fifo": 0o010644}
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are part of the test
        for kind, (name, target, data) in members:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/")
                                           else ""))
            info.create_system = 3
            info.external_attr = modes[kind] << 16
            zf.writestr(info, target.encode() if kind == "symlink" else
                        b"" if kind in ("dir", "fifo") else data)


def make_sentinel(root: Path) -> None:
    """Things beside the destination an escaping archive would hit first."""
    (root / "outside").mkdir()
    (root / "outside" / "f").write_bytes(b"sentinel")
    (root / "outside" / "f").chmod(0o640)
    (root / "x").write_bytes(b"beside dest")
    (root / "etc-link").symlink_to("outside")
    os.utime(root / "outside" / "f", (1_000_000_000, 1_000_000_000))


def snapshot(root: Path, skip: set[str]) -> dict[str, tuple]:
    """Every path under root except ``skip``: type, mode, mtime, content or link target."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in dirnames + filenames + ["."]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip:
                continue
            full = root / rel
            info = os.lstat(full)
            content = (os.readlink(full) if stat.S_ISLNK(info.st_mode) else
                       hashlib.sha1(full.read_bytes()).hexdigest()
                       if stat.S_ISREG(info.st_mode) else None)
            mtime = None if stat.S_ISDIR(info.st_mode) and rel == "." else info.st_mtime_ns
            state[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), mtime, content)
    return state


def must_refuse(kind: str, name: str) -> bool:
    """Members a safe extractor has to refuse: anything but files/dirs, names leaving dest."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    bad_name = name.startswith("/") or ".." in parts or any(len(p) > 255 for p in parts)
    return kind not in ("file", "dir") or bad_name or (kind == "file" and not parts)


def check_extraction(build, members) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sentinel(root)
        (root / "archives").mkdir()
        archive = root / "archives" / ("a.zip" if build is build_zip else "a.tar")
        build(archive, members)
        dest = root / "dest"
        dest.mkdir()
        before = snapshot(root, {"dest"})
        try:
            extract_archives([archive], dest, Budget(max_bytes=1 << 20, max_members=100))
            refused = None
        except StageError as exc:
            refused = exc
        assert snapshot(root, {"dest"}) == before  # nothing outside changed, whatever happened
        if any(must_refuse(kind, m[0]) for kind, m in members):
            assert refused is not None, members
        if refused is None:
            real = os.path.realpath(dest)
            for path in dest.rglob("*"):
                mode = os.lstat(path).st_mode
                assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), path
                assert not mode & (stat.S_ISUID | stat.S_ISGID), path
                assert os.path.commonpath([real, os.path.realpath(path)]) == real


@SETTINGS
@given(tar_members)
def test_random_tar_extracts_inside_or_refuses(members):
    check_extraction(build_tar, members)


@SETTINGS
@given(zip_members)
def test_random_zip_extracts_inside_or_refuses(members):
    check_extraction(build_zip, members)
