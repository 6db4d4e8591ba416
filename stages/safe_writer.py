"""Writing an archive's checked members under a destination directory without following links.

``Writer`` creates the directories and files ``stages.extract`` planned (and checked) under
``dest``: directories with ``mkdir`` and files with ``O_CREAT | O_EXCL | O_NOFOLLOW``, each
opened relative to its parent directory's descriptor (opened with ``O_NOFOLLOW``), so no link is
ever followed, not even one another process put into the destination; every created path is
checked to resolve inside the destination, and the bytes really written are counted against the
extraction's budget (declared sizes can lie).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from stages.common import StageError

if TYPE_CHECKING:  # annotations only: stages.extract imports this module
    from stages.extract import Budget, Member

COPY_CHUNK = 1 << 20
_OPEN_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Writer:
    """Creates the planned directories and files under ``dest``, never following a link."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.real = os.path.realpath(dest)
        self.root = os.open(dest, _OPEN_DIR)
        self._parent: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        self._drop_parent()
        os.close(self.root)

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        """A descriptor of directory ``parts`` (created as needed, each step O_NOFOLLOW)."""
        if self._parent is not None and self._parent[0] == parts:
            return self._parent[1]
        self._drop_parent()
        fd = os.dup(self.root)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self._parent = (parts, fd)
        return fd

    def _check_inside(self, member: Member) -> None:
        real = os.path.realpath(os.path.join(self.dest, *member.parts))
        if os.path.commonpath([self.real, real]) != self.real:
            raise StageError(f"{self.dest}: {member.name!r} resolves outside the destination")

    def make_dir(self, member: Member) -> None:
        self._open_dir(member.parts)
        self._check_inside(member)

    def write_file(self, member: Member, src: BinaryIO, budget: Budget, archive: Path) -> None:
        """Create the member's file (replacing an earlier archive's file, never a link)."""
        parent = self._open_dir(member.parts[:-1])
        name = member.parts[-1]
        try:
            fd = os.open(name, _OPEN_FILE, 0o644, dir_fd=parent)
        except FileExistsError:  # the same file in an earlier archive: replace it, not append
            if not stat.S_ISREG(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise StageError(f"{archive}: {member.name!r} would replace a non-file") from None
            os.unlink(name, dir_fd=parent)
            fd = os.open(name, _OPEN_FILE, 0o644, dir_fd=parent)
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(COPY_CHUNK), b""):
                budget.wrote(archive, member.name, len(block))
                out.write(block)
        self._check_inside(member)
