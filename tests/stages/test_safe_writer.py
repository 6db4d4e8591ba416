"""Writing planned archive members (stages/safe_writer.py): never through a link, never past
the byte budget, whatever the archive declared."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from stages.common import StageError
from stages.extract import Budget, Member
from stages.safe_writer import Writer


@pytest.fixture
def work(tmp_path) -> Path:
    """tmp/dest the destination, tmp/outside/secret a file beside it the writer may not touch."""
    for sub in ("dest", "outside"):
        (tmp_path / sub).mkdir()
    (tmp_path / "outside" / "secret").write_text("untouched")
    return tmp_path


def write(work: Path, name: str, data: bytes, budget: Budget | None = None) -> None:
    """Write one file member ``name`` into tmp/dest, closing the writer whatever happens."""
    writer = Writer(work / "dest")
    try:
        writer.write_file(Member(name, tuple(name.split("/")), False, len(data)),
                          io.BytesIO(data), budget or Budget(max_bytes=1000, max_members=10),
                          Path("a.zip"))
    finally:
        writer.close()


def test_written_bytes_are_counted_whatever_was_declared(work):
    """Declared sizes can lie in principle: the copy itself stops at the cap."""
    budget = Budget(max_bytes=1000, max_members=10)
    writer = Writer(work / "dest")
    try:
        with pytest.raises(StageError, match="'m' takes the output past unpack.max_total_bytes"):
            writer.write_file(Member("m", ("m",), False, 10), io.BytesIO(bytes(5000)), budget,
                              Path("a.zip"))
    finally:
        writer.close()
    assert (work / "dest" / "m").stat().st_size <= 1000  # the block over the cap: never written


def test_a_linked_directory_in_the_destination_is_not_followed(work):
    """A symlink another process put where a member's directory goes is not opened."""
    (work / "dest" / "d").symlink_to(work / "outside")
    with pytest.raises(OSError):
        write(work, "d/secret", b"overwritten?")
    assert (work / "outside" / "secret").read_text() == "untouched"
    assert sorted(p.name for p in (work / "outside").iterdir()) == ["secret"]


def test_a_linked_file_in_the_destination_is_not_replaced_through(work):
    (work / "dest" / "f").symlink_to(work / "outside" / "secret")
    with pytest.raises(StageError, match="'f' would replace a non-file"):
        write(work, "f", b"overwritten?")
    assert (work / "outside" / "secret").read_text() == "untouched"
    assert (work / "dest" / "f").is_symlink()


def test_a_file_written_twice_is_replaced_not_appended(work):
    write(work, "VOC/list.txt", b"old and long")
    write(work, "VOC/list.txt", b"new")
    assert (work / "dest" / "VOC" / "list.txt").read_bytes() == b"new"
