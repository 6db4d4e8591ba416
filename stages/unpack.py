"""Unpack one dataset's verified archives, safely and all-or-nothing: ``data.<dataset>.expect``.

    python -m stages.unpack coco --archives data/downloads/coco --out data/coco

Every archive in ``--archives`` (zip, tar, tar.gz/bz2/xz; in file-name order) is extracted into
ONE temporary directory beside ``--out``, which replaces ``--out`` with a single rename once all
archives are in and every path of ``data.<dataset>.expect`` exists. So a failure (unsafe entry,
archive bomb, corrupt archive, missing layout) leaves no half-unpacked dataset behind.

Safety (stages/extract.py): only regular files and directories are extracted; every other
member type, an absolute or '..' name, or more than the ``unpack`` caps is refused before
anything is written; nothing is written outside the temporary directory. ``--out`` must be
absent, empty or a dataset this stage wrote (stages/outputs.py), and must not overlap
``--archives``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import Field

from stages.common import StageError, atomic_path, main_guard
from stages.config import Section, load_branch, load_section
from stages.data_params import Dataset
from stages.extract import Budget, extract_archives
from stages.outputs import check_outputs

log = logging.getLogger(__name__)


class UnpackParams(Section):
    """params.yaml ``unpack``: limits against archive bombs (per dataset, all archives)."""

    max_total_bytes: int = Field(gt=0)
    max_members: int = Field(gt=0)


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


def unpack_dataset(archives: list[Path], out: Path, expect: list[str], params: UnpackParams,
                   expect_key: str = "expect") -> None:
    """Extract ``archives`` into a temp dir beside ``out``, check ``expect``, rename into place."""
    budget = Budget(params.max_total_bytes, params.max_members)
    with atomic_path(out, kind="dir") as tmp:
        tmp.mkdir()
        log.info("extracting %s", ", ".join(a.name for a in archives))
        extract_archives(archives, tmp, budget)
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
    check_outputs(dirs={"--out": args.out}, inputs={"--archives": args.archives})
    unpack_dataset(list_archives(args.archives), args.out, dataset.expect, params,
                   expect_key=f"data.{args.dataset}.expect")
    return 0


if __name__ == "__main__":
    main_guard(main)
