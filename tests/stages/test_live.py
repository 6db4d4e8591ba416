"""dvclive logging of the training curves: one step per epoch, validation only where it ran."""
from __future__ import annotations

import json

from stages.live import live_logger, open_live


def record(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "loss": 2.0 / epoch, "cls_loss": 1.0, "box_loss": 1.0 / epoch,
            "anchor_acc": 0.5, "images_per_s": 10.0, "lr": 0.1, **extra}


def rows(path) -> list[list[str]]:
    """tsv rows without the timestamp column."""
    table = [line.split("\t") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(table[0]) if name != "timestamp"]
    return [[r[i] for i in keep] for r in table]


def test_epochs_become_steps_and_only_that_directory_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    live = open_live(tmp_path / "live")
    log_epoch = live_logger(live)
    for epoch in (1, 2, 3):
        log_epoch(record(epoch, **({"map": 40.0 + epoch} if epoch % 2 == 0 else {})))
    live.end()
    curves = tmp_path / "live" / "plots" / "metrics"
    assert rows(curves / "train" / "loss.tsv") == [["step", "loss"], ["1", "2.0"], ["2", "1.0"],
                                                   ["3", "0.6666666666666666"]]
    assert rows(curves / "val" / "map.tsv") == [["step", "map"], ["2", "42.0"]]
    # no speed: these files are git-tracked and must not change between identical runs
    assert sorted(p.name for p in (curves / "train").iterdir()) == [
        "anchor_acc.tsv", "box_loss.tsv", "cls_loss.tsv", "loss.tsv", "lr.tsv"]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert sorted(summary["train"]) == ["anchor_acc", "box_loss", "cls_loss", "loss", "lr"]
    assert "timestamp" not in (curves / "train" / "loss.tsv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]  # no report, no dvc.yaml
