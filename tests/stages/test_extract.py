"""Safe extraction (stages/extract.py): only regular files and directories, checked before any
write, never through a link, never outside the destination."""
from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from stages.common import StageError
from stages.extract import Budget, extract_archives
from stages.outputs import MARKER
from stages.safe_writer import Writer
from tests.stages.archive_helpers import add_tar_members, make_tar, make_zip

BUDGET = dict(max_bytes=1_000_000, max_members=100)


@pytest.fixture
def work(tmp_path) -> Path:
    """tmp/archives for the archives, tmp/dest the (empty) destination, tmp/outside/secret a
    file beside it that no archive may touch."""
    for sub in ("archives", "dest", "outside"):
        (tmp_path / sub).mkdir()
    (tmp_path / "outside" / "secret").write_text("untouched")
    (tmp_path / "outside" / "secret").chmod(0o600)
    return tmp_path


def extract(work: Path, *names: str, **budget) -> Path:
    archives = [work / "archives" / n for n in names] or sorted((work / "archives").iterdir())
    extract_archives(archives, work / "dest", Budget(**{**BUDGET, **budget}))
    return work / "dest"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*"))


def assert_untouched(work: Path) -> None:
    """Nothing was written: the destination is still empty, the file beside it unchanged."""
    assert os.listdir(work / "dest") == []
    secret = work / "outside" / "secret"
    assert secret.read_text() == "untouched" and secret.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(work / "outside")) == ["secret"]


def test_files_and_directories_of_zip_and_tars(work):
    make_zip(work / "archives" / "1.zip", {"a/1.txt": b"one", "a/sub/": b""},
             compression=zipfile.ZIP_DEFLATED)
    make_tar(work / "archives" / "2.tar.gz", {"./b/2.txt": b"two", "a/3.txt": b"three"},
             mode="w:gz")
    dest = extract(work)
    assert tree(dest) == ["a/", "a/1.txt", "a/3.txt", "a/sub/", "b/", "b/2.txt"]
    assert (dest / "b" / "2.txt").read_bytes() == b"two"


def test_does_not_need_tarfiles_data_filter(work, monkeypatch):
    """Interpreters before 3.11.4/3.10.12 have no tarfile.data_filter: extraction works there
    too (stages/__init__.py accepts every 3.10/3.11)."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "FilterError", raising=False)
    make_tar(work / "archives" / "a.tar", {"d/f.txt": b"x"})
    assert tree(extract(work)) == ["d/", "d/f.txt"]


TAR_LINKS = {
    "symlink inside": ({"f": b"1"}, {"l": (tarfile.SYMTYPE, "f")}, "'l': a symlink to 'f'"),
    "symlink outside": ({}, {"l": (tarfile.SYMTYPE, "../outside/secret")}, "'l': a symlink"),
    "hard link inside": ({"f": b"1"}, {"h": (tarfile.LNKTYPE, "f")}, "'h': a hard link to 'f'"),
    "hard link outside": ({}, {"h": (tarfile.LNKTYPE, "../outside/secret")}, "'h': a hard link"),
    "character device": ({}, {"c": (tarfile.CHRTYPE, "")}, "'c': a character device"),
    "block device": ({}, {"b": (tarfile.BLKTYPE, "")}, "'b': a block device"),
    "fifo": ({}, {"p": (tarfile.FIFOTYPE, "")}, "'p': a FIFO"),
}


@pytest.mark.parametrize("entries, links, needle", TAR_LINKS.values(), ids=TAR_LINKS.keys())
def test_tar_member_that_is_not_a_file_or_directory_is_refused_before_any_write(
        work, entries, links, needle):
    make_tar(work / "archives" / "0-good.tar", {"good/first.txt": b"written first?"})
    make_tar(work / "archives" / "1-bad.tar", {"good/x": b"x", **entries}, links)
    with pytest.raises(StageError, match=f"1-bad.tar: unsafe entry {needle}.*only regular "
                                         "files and directories are extracted"):
        extract(work)
    assert_untouched(work)


ZIP_ODD = {
    "symlink": ({"l": "../outside/secret"}, {}, "'l': a symlink"),
    "fifo": ({}, {"p": 0o010644}, "'p': a FIFO"),
    "character device": ({}, {"c": 0o020644}, "'c': a character device"),
    "socket": ({}, {"s": 0o140644}, "'s': a socket"),
}


@pytest.mark.parametrize("symlinks, modes, needle", ZIP_ODD.values(), ids=ZIP_ODD.keys())
def test_zip_entry_that_is_not_a_file_or_directory_is_refused(work, symlinks, modes, needle):
    make_zip(work / "archives" / "a.zip", {"ok.txt": b"1"}, symlinks=symlinks, modes=modes)
    with pytest.raises(StageError, match=f"a.zip: unsafe entry {needle}"):
        extract(work)
    assert_untouched(work)


def test_hard_link_to_an_in_archive_symlink_is_refused(work):
    """The shape of CVE-2025-4330/4138 (a hard link to a symlink that points out, which the
    `data` filter let through): refused at the first link, nothing written anywhere."""
    sym = tarfile.TarInfo("s")
    sym.type, sym.linkname = tarfile.SYMTYPE, "../outside/secret"
    hard = tarfile.TarInfo("h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "s"
    data = tarfile.TarInfo("h")
    data.size = 4
    add_tar_members(work / "archives" / "cve.tar", [sym, hard, (data, b"evil")])
    with pytest.raises(StageError, match="'s': a symlink"):
        extract(work)
    assert_untouched(work)


def test_symlink_chain_past_path_max_is_refused(work):
    """The shape of CVE-2025-4517 (a chain of long symlinks that realpath() gives up on)."""
    members, name = [], ""
    for i in range(16):
        part = f"{i:02d}" + "d" * 250
        directory = tarfile.TarInfo(f"{name}{part}")
        directory.type = tarfile.DIRTYPE
        link = tarfile.TarInfo(f"{name}{i:02d}")
        link.type, link.linkname = tarfile.SYMTYPE, part
        members += [directory, link]
        name += f"{i:02d}/"
    escape = tarfile.TarInfo("escape")
    escape.type, escape.linkname = tarfile.SYMTYPE, name + "../" * 17 + "outside/secret"
    add_tar_members(work / "archives" / "chain.tar", members + [escape])
    with pytest.raises(StageError, match="chain.tar: unsafe entry '00': a symlink"):
        extract(work)
    assert_untouched(work)


@pytest.mark.parametrize("name, needle", [
    ("../evil.txt", "'..' leads outside"),
    ("a/../../evil.txt", "'..' leads outside"),
    ("/etc/evil", "absolute path"),
    ("C:/evil", "absolute path"),
    ("a\\..\\..\\evil", "'..' leads outside"),
    ("x" * 256, "name too long"),
    ("/".join(["y" * 200] * 21), "name too long"),
    (MARKER, "the stages' own marker file"),
])
def test_unsafe_names_are_refused_in_tar_and_zip(work, name, needle):
    for suffix in (".tar", ".zip"):
        path = work / "archives" / f"a{suffix}"
        (make_tar if suffix == ".tar" else make_zip)(path, {"ok": b"1", name: b"x"})
        with pytest.raises(StageError, match=f"a{suffix}: unsafe entry .*{needle}"):
            extract(work, path.name)
        assert_untouched(work)


@pytest.mark.parametrize("members, needle", [
    ([("a", b"1"), ("a/b", b"2")], "'a/b': 'a' is a file of this dataset, not a directory"),
    ([("a", b"1"), ("a/", None)], "'a': a dir where another member made a file"),
    ([("a/b", b"1"), ("a", b"2")], "'a': a file where another member made a dir"),
])
def test_a_path_cannot_be_a_file_and_a_directory(work, members, needle):
    infos = []
    for name, data in members:
        info = tarfile.TarInfo(name)
        if data is None:
            info.type = tarfile.DIRTYPE
            infos.append(info)
        else:
            info.size = len(data)
            infos.append((info, data))
    add_tar_members(work / "archives" / "a.tar", infos)
    with pytest.raises(StageError, match=needle):
        extract(work)
    assert_untouched(work)


def test_a_later_file_replaces_an_earlier_one(work):
    """The same file in two archives of a dataset (or twice in one): the last one wins."""
    make_tar(work / "archives" / "1.tar", {"VOC/list.txt": b"old"})
    info = tarfile.TarInfo("VOC/list.txt")
    info.size = 3
    add_tar_members(work / "archives" / "2.tar", [(info, b"mid"), (info, b"new")])
    assert (extract(work) / "VOC" / "list.txt").read_bytes() == b"new"


def test_writer_never_follows_a_link_that_appeared_in_the_destination(work):
    """Even a symlink that some other process put into the destination is not followed."""
    (work / "dest" / "d").symlink_to(work / "outside")
    make_tar(work / "archives" / "a.tar", {"d/secret": b"overwritten?"})
    with pytest.raises(StageError, match="extraction failed"):
        extract(work)
    assert (work / "outside" / "secret").read_text() == "untouched"
    writer = Writer(work / "dest")
    writer.close()


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
        extract(work)
    assert_untouched(work)


def test_size_cap_counts_all_archives_of_a_dataset(work):
    for i in range(3):
        make_zip(work / "archives" / f"part{i}.zip", {f"f{i}": bytes(400_000)})
    with pytest.raises(StageError, match="part2.zip: declares more than"):
        extract(work)
    assert_untouched(work)  # checked for every archive before the first is written


def test_too_many_entries_is_refused(work):
    make_tar(work / "archives" / "many.tar", {f"f{i}": b"" for i in range(101)})
    with pytest.raises(StageError, match="more than unpack.max_members = 100 entries"):
        extract(work)
    assert_untouched(work)
