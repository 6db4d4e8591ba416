"""Fetch one of GluonCV's pretrained weight files into the pipeline, sha1-checked: ``weights.<name>``.

    python -m stages.fetch_weights vgg16_atrous --out model/pretrained/vgg16_atrous.params

``<name>`` is an entry of GluonCV's model store registry (``vgg16_atrous``: the ImageNet-pretrained
VGG16-atrous base the train stage starts from; ``ssd_300_vgg16_atrous_coco``: the COCO detector
the convert stage exports). The file becomes a DVC output: the stages that use it depend on a
file DVC hashes and caches, and a CI runner gets it with ``dvc pull`` (stages/pretrained.py).

``weights.<name>.source``:
- ``zoo``: GluonCV's cached copy if it has the registered sha1 (read, never written), else
  GluonCV's own download (``get_model_file``: zip, unpack, sha1 check) into a temp directory
  beside ``--out``, within ``deadline_s``.
- a path: a local copy of the file (offline), refused unless its sha1 is the registered one.
Whatever the source, ``--out`` is written atomically and only with the registered content. An
offline failure says which file to provide (name, sha1, URL) and where to put it.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pydantic import Field

from stages.common import atomic_path, main_guard
from stages.config import Section, load_branch
from stages.outputs import check_outputs, leftovers, remove_path, temp_name
from stages.pretrained import WeightFile, copy_local, download, find_cached, registered

log = logging.getLogger(__name__)

DOWNLOAD_SUFFIX = ".download"  # the temp directory GluonCV downloads into, beside --out


class WeightsParams(Section):
    """params.yaml ``weights.<name>``."""

    source: str = Field(min_length=1)  # zoo | path of a local copy of the file
    deadline_s: float = Field(gt=0)    # the whole zoo download (GluonCV's has no timeout)


def fetch(entry: WeightFile, p: WeightsParams, out: Path, params_key: str) -> str:
    """Write the registered file to ``out``; return where it came from."""
    for leftover in leftovers(out, (DOWNLOAD_SUFFIX,)):  # a killed run's download dir
        remove_path(leftover)
    with atomic_path(out, kind="file") as tmp:
        if p.source != "zoo":
            copy_local(Path(p.source), entry, tmp, f"{params_key}.source")
            return p.source
        cached = find_cached(entry)
        if cached is not None:
            log.info("copying %s from GluonCV's cache (sha1 matches)", cached)
            copy_local(cached, entry, tmp, f"{params_key}.source")
            return str(cached)
        workdir = temp_name(out, DOWNLOAD_SUFFIX)
        try:
            workdir.mkdir()
            os.replace(download(entry, workdir, p.deadline_s, f"{params_key}.source"), tmp)
        finally:
            remove_path(workdir)
        return entry.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="GluonCV model store name, a key of params `weights`")
    parser.add_argument("--out", required=True, type=Path, help="where to write the .params file")
    args = parser.parse_args(argv)
    p = load_branch("weights", args.name, WeightsParams)
    entry = registered(args.name)
    source = [Path(p.source)] if p.source != "zoo" else []
    check_outputs(files={"--out": args.out}, inputs={f"weights.{args.name}.source": source})
    origin = fetch(entry, p, args.out, f"weights.{args.name}")
    log.info("%s: %s (sha1 %s, GluonCV's registered content) from %s", args.name, args.out,
             entry.sha1, origin)
    return 0


if __name__ == "__main__":
    main_guard(main)
