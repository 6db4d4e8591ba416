"""Download one dataset's archives, checksum-verified, resumable: ``data.<dataset>.archives``.

    python -m stages.download coco --out data/downloads/coco --partial-dir data/.partial/coco

Each archive streams into ``<partial-dir>/<name>.part`` (outside the DVC output, so DVC never
deletes or caches half a download), hashing md5 and sha1 as the bytes arrive, and moves into
``--out`` (one rename) only when both checksums match: the output never holds an unverified
archive. Resume, retries, deadline and size bound: stages/fetch.py.

Ownership (stages/outputs.py): ``--out`` and ``--partial-dir`` are directories this stage keeps
(marked); an existing one may hold only what the stage writes there (archives, resp.
``*.part`` files, and its own temp files), else the stage refuses to start (exit 2). Stale
entries (archives no longer listed) are the only things it deletes.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pydantic import Field

from stages.common import main_guard
from stages.config import Section, load_branch, load_section
from stages.data_params import Dataset, is_archive_name
from stages.fetch import PARTIAL_SUFFIX, Limits, fetch_archive, local_source, new_session
from stages.outputs import check_outputs, claim_dir, leftovers, remove_path

log = logging.getLogger(__name__)


class DownloadParams(Section):
    """params.yaml ``download``: how patient and how generous the downloader is."""

    timeout_s: float = Field(gt=0)        # connect timeout, and longest wait for the next bytes
    retries: int = Field(ge=0)            # failed attempts tolerated in a row (without progress)
    backoff_s: float = Field(ge=0)        # wait before the first retry; doubles each retry
    backoff_max_s: float = Field(ge=0)    # cap on one wait
    chunk_bytes: int = Field(ge=1024, le=64 << 20)
    deadline_s: float = Field(gt=0)       # one archive, all attempts and waits included
    max_bytes: int = Field(gt=0)          # largest archive accepted

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


def _is_stage_temp(directory: Path, entry: os.DirEntry, names: list[str]) -> bool:
    return any(Path(entry.path) in leftovers(directory / name, ("", ".old")) for name in names)


def claim_dirs(out: Path, partial: Path, names: list[str]) -> None:
    """Claim both directories (stages/outputs.claim_dir), recognising the stage's entries."""
    def archive(entry: os.DirEntry) -> bool:  # an archive (a DVC checkout may link it)
        return ((entry.is_file() or entry.is_symlink()) and is_archive_name(entry.name)) or \
            _is_stage_temp(out, entry, names)

    def part(entry: os.DirEntry) -> bool:
        return entry.is_file(follow_symlinks=False) and entry.name.endswith(PARTIAL_SUFFIX) \
            and is_archive_name(entry.name[:-len(PARTIAL_SUFFIX)])

    claim_dir(out, "--out", archive)
    claim_dir(partial, "--partial-dir", part)


def remove_stale(out: Path, partial: Path, names: list[str]) -> list[Path]:
    """Delete archives and partial files of archives no longer listed; returns them."""
    keep = set(names) | {n + PARTIAL_SUFFIX for n in names}
    stale = [p for d in (out, partial) for p in sorted(d.iterdir())
             if p.name not in keep and not p.name.startswith(".")]
    for path in stale:  # only recognised entries are here (claim_dirs checked every one)
        remove_path(path)
    return stale


def download_dataset(dataset: Dataset, out_dir: Path, partial_dir: Path,
                     params: DownloadParams) -> list[Path]:
    """Fetch every archive of ``dataset`` into ``out_dir``; remove what the list no longer has."""
    names = [a.name for a in dataset.archives.values()]
    claim_dirs(out_dir, partial_dir, names)
    for stale in remove_stale(out_dir, partial_dir, names):
        log.info("removed stale %s", stale)
    with new_session() as session:
        return [fetch_archive(a, out_dir, partial_dir, params.limits(), session)
                for a in dataset.archives.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="key under params `data` (e.g. coco, voc)")
    parser.add_argument("--out", required=True, type=Path, help="directory of verified archives")
    parser.add_argument("--partial-dir", required=True, type=Path,
                        help="where unverified partial downloads live (not a DVC output)")
    args = parser.parse_args(argv)
    dataset = load_branch("data", args.dataset, Dataset)
    params = load_section("download", DownloadParams)
    sources = [src for src in map(local_source, (a.url for a in dataset.archives.values()))
               if src]
    check_outputs(own_dirs={"--out": args.out, "--partial-dir": args.partial_dir},
                  inputs={f"a local archive of data.{args.dataset}.archives": sources})
    paths = download_dataset(dataset, args.out, args.partial_dir, params)
    log.info("%s: %d archive(s) verified in %s", args.dataset, len(paths), args.out)
    return 0


if __name__ == "__main__":
    main_guard(main)
