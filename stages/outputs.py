"""What a stage may replace or delete: only what it wrote itself.

Rules (every stage, through ``atomic_path`` and ``check_outputs``):

- Never a protected path: the directory the stage runs in or any directory containing it (``.``,
  ``..``, ``/``), a repository root (a directory holding ``.git`` or ``.dvc``), the home
  directory, and the pipeline's params.yaml, dvc.yaml and dvc.lock.
- A file output may replace a regular file or a symlink (the link itself; it is never
  followed), never a directory or a special file.
- A directory output may replace only a directory a stage of this project wrote, recognised by
  the marker file ``MARKER`` that every such directory holds, or an empty one; never a symlink.
- No output may be, contain, or lie inside an input (params.yaml included) or another output.
- Cleanup deletes only the stage's own temporary files, recognised by their exact name pattern
  (``.<name>.<8 chars><suffix>.tmp``), or entries a stage recognises as its own (``claim_dir``).

A refusal is an ``OutputError``: exit code 2, nothing written or deleted.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

from stages.config import PARAMS_FILE, UsageError

PathLike = Union[str, os.PathLike]
MARKER = ".ssd-repro-output"
MARKER_TEXT = ("This directory is an output of an ssd-repro stage (python -m stages.<name>).\n"
               "The stage replaces it whole on its next run: keep nothing else here.\n")
_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
PIPELINE_FILES = (PARAMS_FILE, "dvc.yaml", "dvc.lock")  # in the directory a stage runs in


class OutputError(UsageError):
    """An output path the stage must not write or replace (exit code 2, nothing touched)."""


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(path))


def protected_reason(path: PathLike) -> str | None:
    """Why ``path`` must never be replaced or emptied by a stage, or None."""
    real, cwd = _real(path), _real(os.getcwd())
    if real == cwd:
        return "it is the directory the stage runs in"
    if real in cwd.parents:
        return "it contains the directory the stage runs in"
    if real == _real(Path.home()):
        return "it is the home directory"
    if real.parent == cwd and real.name in PIPELINE_FILES:
        return f"it is the pipeline's {real.name}"
    if real.is_dir() and any(os.path.lexists(real / name) for name in (".git", ".dvc")):
        return "it is a repository root (it holds .git or .dvc)"
    return None


def is_marked(directory: PathLike) -> bool:
    """True if ``directory`` holds the marker of a stage-written directory (a regular file)."""
    try:
        return stat.S_ISREG(os.lstat(Path(directory) / MARKER).st_mode)
    except OSError:
        return False


def mark(directory: PathLike) -> None:
    """Put the marker into a directory the stage has just written (if it is not there yet)."""
    marker = Path(directory) / MARKER
    if not os.path.lexists(marker):
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(MARKER_TEXT)


def _kind_of(path: Path) -> str | None:
    """'link', 'dir', 'file', 'special' or None (absent), without following a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special"


def check_replaceable(final: PathLike, kind: str | None = None, what: str = "") -> None:
    """Refuse (OutputError) to replace ``final`` with a new ``kind`` ('file'/'dir'/None) unless
    the rules in this module's docstring allow it."""
    final = Path(final)
    label = f"{what} {final}".strip()
    found = _kind_of(final)
    if found is None:
        reason = protected_reason(final)  # e.g. '..' of a directory that does not exist yet
    elif found == "special":
        reason = "it is a special file (device, FIFO or socket), not a stage output"
    elif found == "link":
        reason = "it is a symlink; a directory output is never written through a link" \
            if kind == "dir" else None
    elif found == "file":
        reason = "it is a file; a directory is expected here" if kind == "dir" else \
            protected_reason(final)
    elif kind == "file":
        reason = "it is a directory; a file is expected here"
    else:
        reason = protected_reason(final)
        if reason is None and not is_marked(final) and any(os.scandir(final)):
            reason = (f"it is a directory a stage did not write (no {MARKER} marker) and it is "
                      "not empty; remove it or choose another path")
    if reason:
        raise OutputError(f"{label}: refusing to replace it: {reason}; nothing was changed")


def temp_name(final: PathLike, suffix: str = "") -> Path:
    """A fresh temp path beside ``final``: ``.<name>.<8 random chars><suffix>.tmp``."""
    final = Path(final)
    token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(8))
    return final.parent / f".{final.name}.{token}{suffix}.tmp"


def leftovers(final: PathLike, suffixes: Sequence[str] = ("",)) -> list[Path]:
    """Temp paths of earlier runs for ``final`` (exactly the names ``temp_name`` makes)."""
    final = Path(final)
    alternatives = "|".join(re.escape(s) for s in suffixes)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9]{{8}}(?:{alternatives})\.tmp")
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    return [final.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def remove_path(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a directory tree."""
    if _kind_of(path) == "dir":
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def claim_dir(directory: PathLike, what: str,
              recognise: Callable[[os.DirEntry], bool] | None = None) -> Path:
    """Make ``directory`` a directory this stage keeps and writes into (e.g. downloads).

    It is created (with the marker) if absent. An existing one must not be a symlink or a
    protected directory; every entry must be recognised as the stage's own by ``recognise``
    (without it, the directory must carry the marker or be empty). Returns the directory.
    """
    directory = Path(directory)
    label = f"{what} {directory}"
    found = _kind_of(directory)
    if found is None:
        directory.mkdir(parents=True, exist_ok=True)
    elif found != "dir":
        kind = {"link": "a symlink", "file": "a file"}.get(found, "a special file")
        raise OutputError(f"{label}: is {kind}, not a directory this stage writes into; "
                          "nothing was changed")
    else:
        reason = protected_reason(directory)
        entries = [e for e in os.scandir(directory) if e.name != MARKER]
        if recognise is not None:
            foreign = sorted(e.name for e in entries if not recognise(e))
        else:
            foreign = [] if is_marked(directory) else sorted(e.name for e in entries)
        if reason is None and foreign:
            shown = ", ".join(map(repr, foreign[:5])) + (" ..." if len(foreign) > 5 else "")
            reason = (f"it holds entries this stage did not write ({shown}); move them away "
                      "or choose another directory")
        if reason:
            raise OutputError(f"{label}: refusing to use it: {reason}; nothing was changed")
    mark(directory)
    return directory


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def check_outputs(files: Mapping[str, PathLike] | None = None,
                  dirs: Mapping[str, PathLike] | None = None,
                  own_dirs: Mapping[str, PathLike] | None = None,
                  inputs: Mapping[str, PathLike | Iterable[PathLike]] | None = None,
                  params_file: PathLike | None = PARAMS_FILE) -> None:
    """Check every output path of a stage at its entry, before any work (OutputError if not).

    ``files``: file outputs; ``dirs``: directory outputs replaced whole (atomic_path);
    ``own_dirs``: directories the stage keeps and writes into (claim_dir). Keys name the path
    in messages (e.g. ``"--out"``). ``inputs`` (and the params file) must not overlap any output.
    """
    outputs = [(flag, Path(p), kind) for kind, group in
               (("file", files), ("dir", dirs), ("own", own_dirs)) for flag, p in (group or {}).items()]
    sources = [(flag, Path(p)) for flag, group in (inputs or {}).items()
               for p in ([group] if isinstance(group, (str, os.PathLike)) else group)]
    if params_file is not None:
        sources.append(("the params file", Path(params_file)))
    for flag, out, kind in outputs:  # the worst first: '.', the repository, home
        reason = protected_reason(out)
        if reason:
            verb = "use" if kind == "own" else "replace"
            raise OutputError(f"{flag} {out}: refusing to {verb} it: {reason}; nothing was "
                              "changed")
    for i, (flag, out, kind) in enumerate(outputs):
        for other_flag, other in sources + [(f, o) for f, o, _ in outputs[i + 1:]]:
            relation = _overlap(_real(out), _real(other))
            if relation:
                raise OutputError(f"{flag} {out}: {relation} {other_flag} {other}; an output "
                                  "must not overlap an input or another output; nothing was "
                                  "changed")
    for flag, out, kind in outputs:
        if kind != "own":
            check_replaceable(out, kind, flag)
            continue
        if _kind_of(out) not in (None, "dir"):
            raise OutputError(f"{flag} {out}: is not a directory; nothing was changed")
