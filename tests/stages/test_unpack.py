"""Unpack stage: all-or-nothing extraction of a dataset, and what it may replace (the
extraction rules themselves: test_extract.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.outputs import MARKER, OutputError
from stages.unpack import UnpackParams, list_archives, unpack_dataset
from tests.stages.archive_helpers import make_tar, make_zip

PARAMS = UnpackParams(max_total_bytes=1_000_000, max_members=100)


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
             mode="w:gz")
    make_tar(work / "archives" / "VOCtrain.tar", {"VOCdevkit/VOC2012/train.txt": b"2\n"})
    out = unpack(work, expect=["val/*.jpg", "annotations/instances.json",
                               "VOCdevkit/VOC2007", "VOCdevkit/VOC2012/train.txt"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [MARKER, "VOCdevkit/VOC2007/test.txt", "VOCdevkit/VOC2012/train.txt",
                     "annotations/instances.json", "val/1.jpg", "val/2.jpg"]
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
    (out / MARKER).write_text("an earlier run wrote this tree")
    leftover = work / "data" / ".ds.k1lledrn.tmp"  # a run killed mid-extraction
    (leftover / "half").mkdir(parents=True)
    not_ours = work / "data" / ".ds.backup"  # a look-alike name the stage never makes
    not_ours.mkdir()
    unpack(work)
    assert sorted(os.listdir(out / "a")) == ["new.txt", "shared.txt"]
    assert (out / "a" / "shared.txt").read_bytes() == b"fresh"
    assert cached.read_bytes() == b"cached"
    assert sorted(os.listdir(work / "data")) == [".ds.backup", "ds"]


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
    params = {"data": {"coco": {"archives": {"a": {"url": "a.zip", "md5": "0" * 32,
                                                   "sha1": "0" * 40}},
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


def test_existing_out_not_written_by_the_stage_is_refused_and_kept(work):
    """A non-empty --out without the stage's marker (someone's own folder) is never replaced."""
    make_zip(work / "archives" / "a.zip", {"a/new.txt": b"new"})
    out = work / "data" / "ds"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=f"{out}: refusing to replace it: it is a directory a "
                                          f"stage did not write \\(no {MARKER} marker\\)"):
        unpack(work)
    assert os.listdir(out) == ["thesis.tex"]
    assert sorted(os.listdir(work / "data")) == ["ds"]


@pytest.mark.parametrize("out, needle", [
    ("link", "--out link: refusing to replace it: it is a symlink"),
    ("file", "--out file: refusing to replace it: it is a file; a directory is expected"),
    (".", "--out .: refusing to replace it: it is the directory the stage runs in"),
    ("..", "--out ..: refusing to replace it: it contains the directory the stage runs in"),
    ("archives", "--out archives: .* --archives archives"),
    ("archives/inner", "--out archives/inner: lies inside --archives archives"),
    ("nested", "--out nested: contains --archives nested/archives"),
])
def test_cli_refuses_an_out_it_must_not_replace(work, out, needle):
    """Exit 2, a message naming --out, and nothing deleted (the archives least of all)."""
    make_zip(work / "archives" / "a.zip", {"a": b"1"})
    (work / "nested" / "archives").mkdir(parents=True)
    make_zip(work / "nested" / "archives" / "a.zip", {"a": b"1"})
    (work / "target").mkdir()
    (work / "target" / "keep.txt").write_text("keep")
    (work / "link").symlink_to("target")
    (work / "file").write_text("a file")
    params = {"data": {"coco": {"archives": {"a": {"url": "a.zip", "md5": "0" * 32,
                                                   "sha1": "0" * 40}},
                                "expect": ["a"]}},
              "unpack": {"max_total_bytes": 1000, "max_members": 5}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    archives = "nested/archives" if out == "nested" else "archives"
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    run = subprocess.run([sys.executable, "-m", "stages.unpack", "coco", "--archives", archives,
                          "--out", out], cwd=work, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert __import__("re").search(needle, run.stderr), run.stderr
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before
