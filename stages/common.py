"""Small helpers every stage shares: logging, atomic writes, stable JSON, seeding, provenance."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from stages import outputs
from stages.config import UsageError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class StageError(RuntimeError):
    """A failure the user can act on: shown as one clear message, without a traceback."""


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once, at a stage's entry point (never at import time).

    A stage run as ``python -m stages.x`` logs under ``__main__``; its records are shown under
    the module's real name (``stages.x``) so ``dvc repro`` output says which stage is talking.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", force=True)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_MainNameFilter(spec.name))


class _MainNameFilter(logging.Filter):
    """Rename records of the ``__main__`` logger (and its children) to the module's name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.main_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "__main__" or record.name.startswith("__main__."):
            record.name = self.main_name + record.name[len("__main__"):]
        return True


def run_stage(main: Callable[[list[str] | None], int | None],
              argv: list[str] | None = None) -> int:
    """Run a stage's ``main`` with logging set up; user errors become exit code 1 or 2.

    Exit 2: bad params or an output path the stage must not write (nothing was done). Exit 1:
    the stage failed (nothing partial is left).
    """
    setup_logging()
    try:
        return main(argv) or 0
    except UsageError as exc:
        logging.getLogger("stages").error("%s", exc)
        return 2
    except StageError as exc:
        logging.getLogger("stages").error("%s", exc)
        return 1


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "", kind: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it replaces ``final``, else it is removed.

    Works for files and directories (``kind`` 'file' or 'dir' lets the check run before the
    work; else the kind written decides): whatever is written at the yielded path is moved into
    place with one ``os.replace`` (same directory, so same filesystem), so readers never see
    half a file. It only ever replaces what a stage may replace (stages/outputs.py): a file or
    symlink where a file goes, a stage-written (marked) or empty directory where a directory
    goes; anything else is an OutputError (exit 2) and nothing is touched. A directory output
    gets the marker. Temp paths a killed earlier run left for ``final`` are removed first.
    """
    final = Path(final)
    outputs.check_replaceable(final, kind)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise outputs.OutputError(f"{final}: cannot create its directory ({exc})") from None
    for leftover in outputs.leftovers(final, (suffix, ".old")):
        log.info("removing %s, left by an interrupted run", leftover)
        outputs.remove_path(leftover)
    tmp = outputs.temp_name(final, suffix)
    try:
        yield tmp
        written = "dir" if tmp.is_dir() and not tmp.is_symlink() else "file"
        outputs.check_replaceable(final, written)  # again: the path may have changed meanwhile
        if written == "dir":
            outputs.mark(tmp)
        if final.is_dir() and not final.is_symlink():
            aside = outputs.temp_name(final, ".old")
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
    finally:
        outputs.remove_path(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, kind="file") as tmp:
        tmp.write_text(text)


def dumps_json(data: Any) -> str:
    """Stable JSON: sorted keys, fixed indent, trailing newline, NaN refused."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as stable JSON, atomically (same input gives byte-identical files)."""
    write_text_atomic(path, dumps_json(data))


def round_floats(data: Any, digits: int = 6) -> Any:
    """Round every float in nested dicts/lists, so metrics files don't show float noise."""
    if isinstance(data, float):
        return data if not math.isfinite(data) else round(data, digits)
    if isinstance(data, dict):
        return {k: round_floats(v, digits) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [round_floats(v, digits) for v in data]
    return data


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and MXNet from one value (called from a stage's main only)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import mxnet as mx
    except ImportError:  # stages that never touch MXNet need not import it
        return
    mx.random.seed(seed)


def file_digest(path: str | Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


LIBRARIES = ("mxnet", "gluoncv", "numpy", "pycocotools", "dvc", "opencv-python")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape results (for provenance records)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def main_guard(main: Callable[[list[str] | None], int | None]) -> None:
    """``if __name__ == "__main__": main_guard(main)`` — run and exit with the stage's code."""
    sys.exit(run_stage(main))
