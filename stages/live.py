"""dvclive for the train stage: one ``Live`` per run, one step per epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def live_logger(live) -> Callable[[dict], None]:
    """Log one epoch record to a dvclive ``Live`` (step = epoch number)."""

    def log_epoch(record: dict) -> None:
        live.step = record["epoch"]
        for key in ("loss", "cls_loss", "box_loss", "anchor_acc", "images_per_s", "lr"):
            live.log_metric(f"train/{key}", record[key])
        if "map" in record:
            live.log_metric("val/map", record["map"])
        live.next_step()

    return log_epoch


def open_live(directory: Path):
    """A dvclive ``Live`` that only writes its directory.

    No report, no dvc.yaml of its own (ours declares the files), no experiment saving; inside
    ``dvc repro``/``dvc exp run`` dvclive detects the pipeline and leaves the repo to DVC.
    """
    from dvclive import Live

    return Live(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
