"""dvclive for the train stage: one ``Live`` per run, one step per epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


# What each epoch logs: accuracy figures only. These files are git-tracked (metrics.json is read
# by `dvc metrics diff`), so they must be byte-identical on an identical rerun: the images/s of
# an epoch varies per run and stays in the stage's log and speed file (metrics/speed_*.json).
CURVES = ("loss", "cls_loss", "box_loss", "anchor_acc", "lr")


def live_logger(live) -> Callable[[dict], None]:
    """Log one epoch record to a dvclive ``Live`` (step = epoch number)."""

    def log_epoch(record: dict) -> None:
        live.step = record["epoch"]
        for key in CURVES:
            live.log_metric(f"train/{key}", record[key])
        if "map" in record:
            live.log_metric("val/map", record["map"])
        live.next_step()

    return log_epoch


# What dvclive writes in its directory (with report=None, dvcyaml=None): nothing else is ours.
LIVE_ENTRIES = ("metrics.json", "plots", "params.yaml", "report.html", "report.md", "dvc.yaml")


def is_live_entry(entry) -> bool:
    """An entry dvclive writes in the train stage's live directory."""
    return entry.name in LIVE_ENTRIES


def remove_live(directory: Path) -> None:
    """Remove what dvclive wrote (a failed run leaves no partial curves); nothing else."""
    from stages.outputs import MARKER, remove_path

    for name in LIVE_ENTRIES:
        path = directory / name
        if path.exists() or path.is_symlink():
            remove_path(path)
    if directory.is_dir() and [p.name for p in directory.iterdir()] == [MARKER]:
        remove_path(directory)  # only the marker left: the directory was this stage's


def open_live(directory: Path):
    """A dvclive ``Live`` that only writes its directory.

    No report, no dvc.yaml of its own (ours declares the files), no experiment saving; inside
    ``dvc repro``/``dvc exp run`` dvclive detects the pipeline and leaves the repo to DVC.
    """
    from dvclive import Live

    return Live(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
