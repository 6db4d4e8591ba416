"""Unpack stage: safe, capped, all-or-nothing extraction of zip and tar archives."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.unpack import Budget, UnpackParams, list_archives, unpack_dataset, write_capped

PARAMS = UnpackParams(max_total_bytes=1_000_000, max_members=100)


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return path


def make_tar(path: Path, entries: dict[str, bytes], links: dict[str, tuple[bytes, str]] = (),
             mode: str = "w") -> Path:
    """``links``: name -> (tarfile.SYMTYPE or LNKTYPE, link target)."""
    with tarfile.open(path, mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in dict(links).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """tmp/archives holds the test's archives; the dataset goes to tmp/data/ds."""
    (tmp_path / "archives").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


def unpack(work: Path, expect=("**/*",), params: UnpackParams = PARAMS) -> Path:
    out = work / "data" / "ds"
    unpack_dataset(list_archives(work / "archives"), out, list(expect), params)
    return out


def assert_nothing_left(work: Path) -> None:
    """A failed unpack leaves neither the dataset dir nor a temp dir beside it."""
    assert os.listdir(work / "data") == []
    assert sorted(p.name for p in work.iterdir()) == ["archives", "data"]


def test_zip_and_tars_merge_into_one_tree(work):
    make_zip(work / "archives" / "annotations.zip", {"annotations/instances.json": b"{}"},
             compression=zipfile.ZIP_DEFLATED)
    make_zip(work / "archives" / "val.zip", {"val/1.jpg": b"jpg1", "val/2.jpg": b"jpg2"})
    make_tar(work / "archives" / "VOCtest.tar.gz", {"VOCdevkit/VOC2007/test.txt": b"1\n"},
             links={"VOCdevkit/VOC2007/latest": (tarfile.SYMTYPE, "test.txt"),
                    "VOCdevkit/VOC2007/same.txt": (tarfile.LNKTYPE, "VOCdevkit/VOC2007/test.txt")},
             mode="w:gz")
    make_tar(work / "archives" / "VOCtrain.tar", {"VOCdevkit/VOC2012/train.txt": b"2\n"})
    out = unpack(work, expect=["val/*.jpg", "annotations/instances.json",
                               "VOCdevkit/VOC2007", "VOCdevkit/VOC2012/train.txt"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["VOCdevkit/VOC2007/latest", "VOCdevkit/VOC2007/same.txt",
                     "VOCdevkit/VOC2007/test.txt", "VOCdevkit/VOC2012/train.txt",
                     "annotations/instances.json", "val/1.jpg", "val/2.jpg"]
    assert (out / "VOCdevkit/VOC2007/latest").resolve() == out / "VOCdevkit/VOC2007/test.txt"
    assert (out / "val/2.jpg").read_bytes() == b"jpg2"
    assert sorted(os.listdir(work / "data")) == ["ds"]  # no temp dir left beside it


def test_rerun_replaces_old_tree_without_writing_into_cached_files(work):
    """DVC may have checked the old tree out as hardlinks to its read-only cache."""
    make_zip(work / "archives" / "a.zip", {"a/new.txt": b"new", "a/shared.txt": b"fresh"})
    out = work / "data" / "ds"
    (out / "a").mkdir(parents=True)
    cached = work / "cache-object"
    cached.write_bytes(b"cached")
    cached.chmod(0o444)
    os.link(cached, out / "a" / "shared.txt")
    (out / "a" / "stale.txt").write_text("from an old archive")
    leftover = work / "data" / ".ds.killed-run.tmp"  # a run killed mid-extraction
    leftover.mkdir()
    unpack(work)
    assert sorted(os.listdir(out / "a")) == ["new.txt", "shared.txt"]
    assert (out / "a" / "shared.txt").read_bytes() == b"fresh"
    assert cached.read_bytes() == b"cached"
    assert sorted(os.listdir(work / "data")) == ["ds"]


@pytest.mark.parametrize("name, build, needle", [
    ("dotdot.zip", lambda p: make_zip(p, {"ok.txt": b"1", "../evil.txt": b"x"}),
     "'../evil.txt': '..' leads outside"),
    ("abs.zip", lambda p: make_zip(p, {"/tmp/evil.txt": b"x"}), "'/tmp/evil.txt': absolute path"),
    ("link.zip", lambda p: make_zip(p, {}, symlinks={"l": "../../etc"}), "'l': symlink entries"),
    ("dotdot.tar", lambda p: make_tar(p, {"a/../../evil.txt": b"x"}),
     "'a/../../evil.txt': .* outside the destination"),
    ("abs.tar", lambda p: make_tar(p, {"/etc/evil": b"x"}), "'/etc/evil': absolute path"),
    ("symlink-out.tar", lambda p: make_tar(p, {}, {"l": (tarfile.SYMTYPE, "../../outside")}),
     "'l': .*outside the destination"),
    ("symlink-abs.tar", lambda p: make_tar(p, {}, {"l": (tarfile.SYMTYPE, "/etc/passwd")}),
     "'l': .*absolute"),
    ("hardlink-out.tar", lambda p: make_tar(p, {}, {"h": (tarfile.LNKTYPE, "../outside")}),
     "'h': .*outside the destination"),
    ("device.tar", lambda p: make_tar(p, {}, {"d": (tarfile.CHRTYPE, "")}), "'d': .*special"),
])
def test_unsafe_entries_are_refused(work, name, build, needle):
    build(work / "archives" / name)
    with pytest.raises(StageError, match=f"{name}: unsafe entry {needle}"):
        unpack(work)
    assert_nothing_left(work)
    assert not (work / "evil.txt").exists()


def test_path_climbing_out_through_an_in_tree_symlink_is_refused(work):
    """'sub/up' -> '..' stays inside; 'sub/up/../../evil.txt' through it does not."""
    make_tar(work / "archives" / "a.tar", {"sub/x": b"1"},
             links={"sub/up": (tarfile.SYMTYPE, "..")})
    with tarfile.open(work / "archives" / "a.tar", "a") as tf:
        info = tarfile.TarInfo("sub/up/../../evil.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(StageError, match="unsafe entry 'sub/up/../../evil.txt'"):
        unpack(work)
    assert_nothing_left(work)


@pytest.mark.parametrize("name, build", [
    ("bomb.zip", lambda p: make_zip(p, {"zeros": bytes(5_000_000)},
                                    compression=zipfile.ZIP_DEFLATED)),
    ("bomb.tar.gz", lambda p: make_tar(p, {"zeros": bytes(5_000_000)}, mode="w:gz")),
])
def test_archive_bomb_is_refused_before_writing(work, name, build):
    build(work / "archives" / name)
    assert (work / "archives" / name).stat().st_size < 20_000  # 5 MB of zeros, compressed
    with pytest.raises(StageError, match=f"{name}: declares more than unpack.max_total_bytes = "
                                         "1000000 .*archive bomb"):
        unpack(work)
    assert_nothing_left(work)


def test_size_cap_counts_all_archives_of_a_dataset(work):
    for i in range(3):
        make_zip(work / "archives" / f"part{i}.zip", {f"f{i}": bytes(400_000)})
    with pytest.raises(StageError, match="part2.zip: declares more than"):
        unpack(work)
    assert_nothing_left(work)


def test_too_many_entries_is_refused(work):
    make_tar(work / "archives" / "many.tar", {f"f{i}": b"" for i in range(101)})
    with pytest.raises(StageError, match="more than unpack.max_members = 100 entries"):
        unpack(work)
    assert_nothing_left(work)


def test_written_bytes_are_counted_whatever_was_declared(tmp_path):
    """Declared sizes can lie in principle: the copy itself stops at the cap."""
    budget = Budget(max_bytes=1000, max_members=10)
    with pytest.raises(StageError, match="'m' takes the output past unpack.max_total_bytes"):
        write_capped(io.BytesIO(bytes(5000)), tmp_path / "m", budget, Path("a.zip"), "m")
    assert (tmp_path / "m").stat().st_size <= 1000  # the block over the cap was never written


def _truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])


def _garble(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + 100] = b"\x07" * 100  # a header block with a wrong checksum
    path.write_bytes(bytes(data))


def _corrupt_zip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[60:70] = b"X" * 10  # inside the first member's stored bytes: CRC check fails
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, needle", [
    ("cut.zip", lambda p: _truncate(p, 0.5), "corrupt or truncated archive: File is not a zip"),
    ("crc.zip", _corrupt_zip, "corrupt or truncated archive: Bad CRC-32"),
    ("cut.tar", lambda p: _truncate(p, 512 + 300), "corrupt or truncated archive: unexpected end"),
    ("cut-at-entry.tar", lambda p: _truncate(p, 512 + 1024),
     "truncated or corrupt tar archive \\(no end-of-archive marker at byte 1536\\)"),
    ("garbled-2nd-header.tar", lambda p: _garble(p, 1536),
     "truncated or corrupt tar archive \\(no end-of-archive marker at byte 1536\\)"),
    ("cut.tar.gz", lambda p: _truncate(p, 0.6), "corrupt or truncated archive"),
    ("garbage.tar", lambda p: p.write_bytes(os.urandom(4096)), "corrupt or truncated archive"),
])
def test_corrupt_or_truncated_archive_fails_clearly(work, name, damage, needle):
    path = work / "archives" / name
    entries = {"a.txt": os.urandom(1000), "b.txt": os.urandom(50_000)}
    if name.endswith(".zip"):
        make_zip(path, entries)
    else:
        make_tar(path, entries, mode="w:gz" if name.endswith(".gz") else "w")
    damage(path)
    with pytest.raises(StageError, match=needle) as err:
        unpack(work)
    assert str(path) in str(err.value)
    assert_nothing_left(work)


def test_missing_expected_layout_fails_and_puts_nothing_in_place(work):
    make_zip(work / "archives" / "val2017.zip", {"val2017/1.jpg": b"1"})
    with pytest.raises(StageError, match="expected paths are missing: "
                                         "annotations/instances_val2017.json"):
        unpack(work, expect=["val2017/*.jpg", "annotations/instances_val2017.json"])
    assert_nothing_left(work)


def test_unknown_archive_type(work):
    (work / "archives" / "data.rar").write_bytes(b"Rar!")
    with pytest.raises(StageError, match="data.rar: unknown archive type; supported: .zip, .tar"):
        unpack(work)


def test_cli_bad_params_exit_2_naming_the_key(work):
    make_zip(work / "archives" / "a.zip", {"a": b"1"})
    params = {"data": {"coco": {"archives": [{"url": "a.zip", "md5": "0" * 32, "sha1": "0" * 40}],
                                "expect": ["a"]}},
              "unpack": {"max_total_bytes": 10, "max_member": 5}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run([sys.executable, "-m", "stages.unpack", "coco", "--archives", "archives",
                          "--out", "data/coco"], cwd=work, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "unpack.max_member: unknown key; allowed keys: max_total_bytes, max_members" \
        in run.stderr
    assert "unpack.max_members: required key is missing" in run.stderr
    assert os.listdir(work / "data") == []
