"""Checkpoints: the resume key, and writing/finding them with a real net and optimizer state."""
from __future__ import annotations

import pytest

from stages.checkpoints import (NOT_IN_FINGERPRINT, checkpoint_paths, clear_checkpoints,
                                find_checkpoint, fingerprint, save_checkpoint)
from stages.train import TrainParams
from tests.stages.train_helpers import CLASSES, train_params

IDS = ["000001", "000002"]


def knobs(**overrides) -> dict:
    return TrainParams.model_validate(train_params(**overrides)).model_dump()


def test_fingerprint_covers_what_shapes_the_trajectory_only():
    base = fingerprint(knobs(), CLASSES, IDS)
    assert base == fingerprint(knobs(), CLASSES, IDS) and len(base) == 64
    for change in ({"lr": 0.01}, {"seed": 3}, {"batch_size": 4}, {"augment": "gluoncv"}):
        assert fingerprint(knobs(**change), CLASSES, IDS) != base, change
    assert fingerprint(knobs(), CLASSES[:2], IDS) != base
    assert fingerprint(knobs(), CLASSES, IDS[:1]) != base
    for change in ({"num_workers": 2}, {"checkpoint_interval": 3}, {"val_interval": 0},
                   {"val_split": [2007, "val"]}, {"val_max_images": 5}):
        assert next(iter(change)) in NOT_IN_FINGERPRINT
        assert fingerprint(knobs(**change), CLASSES, IDS) == base, change
    # where and how the workers run does not matter, how many do (one = one process)
    dist = {"kvstore": "dist_sync", "workers": 1, "servers": 3, "hosts": ["localhost", "b"],
            "scheduler_host": "10.0.0.1", "scheduler_port": 9999, "progress_timeout_s": 5.0}
    assert fingerprint(knobs(distributed=dist), CLASSES, IDS) == base
    assert fingerprint(knobs(distributed={**dist, "workers": 2}), CLASSES, IDS) != base
    # a step schedule can be extended (epochs left out); a cosine schedule cannot
    assert fingerprint(knobs(epochs=9), CLASSES, IDS) == base
    cosine = fingerprint(knobs(schedule="cosine"), CLASSES, IDS)
    assert fingerprint(knobs(schedule="cosine", epochs=9), CLASSES, IDS) != cosine
    # input files by digest: another pretrained base is another trajectory
    with_base = fingerprint(knobs(), CLASSES, IDS, {"pretrained_base": "a" * 40})
    assert with_base != base
    assert fingerprint(knobs(), CLASSES, IDS, {"pretrained_base": "b" * 40}) != with_base
    assert fingerprint(knobs(), CLASSES, IDS, {}) == base


@pytest.fixture
def net_and_trainer():
    import mxnet as mx
    from mxnet import gluon

    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(mx.init.Constant(0.5))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    return net, trainer


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "loss": 1.0 / e} for e in range(1, epochs + 1)]


def test_saved_checkpoint_is_found_and_replaces_older_ones(tmp_path, net_and_trainer):
    net, trainer = net_and_trainer
    save_checkpoint(tmp_path, net, trainer, history(1), "abc")
    save_checkpoint(tmp_path, net, trainer, history(2), "abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0002.json", "epoch-0002.params", "epoch-0002.states"]
    found = find_checkpoint(tmp_path, "abc", epochs=5)
    assert found["epoch"] == 2 and found["history"] == history(2)
    assert found["paths"] == checkpoint_paths(tmp_path, 2)
    net.load_parameters(str(found["paths"]["params"]))
    trainer.load_states(str(found["paths"]["states"]))


def test_checkpoints_of_other_runs_or_incomplete_ones_are_ignored(tmp_path, net_and_trainer,
                                                                  caplog):
    net, trainer = net_and_trainer
    save_checkpoint(tmp_path, net, trainer, history(3), "abc")
    assert find_checkpoint(tmp_path, "other", epochs=5) is None
    assert "made with other params/data" in caplog.text
    assert find_checkpoint(tmp_path, "abc", epochs=2) is None  # more epochs than this run has
    (tmp_path / ".epoch-0004.params.x.tmp").write_text("partial")  # a killed run's leftover
    checkpoint_paths(tmp_path, 3)["states"].unlink()  # weights without optimizer state
    assert find_checkpoint(tmp_path, "abc", epochs=5) is None
    assert not list(tmp_path.glob(".epoch-*.tmp"))
    checkpoint_paths(tmp_path, 3)["json"].write_text("{not json")
    assert find_checkpoint(tmp_path, "abc", epochs=5) is None


def test_the_json_is_written_last(tmp_path, net_and_trainer, monkeypatch):
    """A failure while saving the optimizer state leaves no json: the checkpoint never counts."""
    net, trainer = net_and_trainer

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "save_states", broken)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, net, trainer, history(1), "abc")
    assert not list(tmp_path.glob("*.json")) and find_checkpoint(tmp_path, "abc", 5) is None


def test_clearing_removes_the_checkpoints_and_nothing_else(tmp_path, net_and_trainer):
    """What a completed run does: no checkpoint is left to resume from; other files stay."""
    net, trainer = net_and_trainer
    save_checkpoint(tmp_path, net, trainer, history(2), "abc")
    (tmp_path / ".epoch-0003.params.abcdefgh.tmp").write_text("a killed save")
    (tmp_path / "epoch-0002.json.bak").write_text("not ours")
    (tmp_path / "notes").mkdir()
    removed = clear_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [".epoch-0003.params.abcdefgh.tmp",
                                               "epoch-0002.json", "epoch-0002.params",
                                               "epoch-0002.states"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.json.bak", "notes"]
    assert find_checkpoint(tmp_path, "abc", epochs=5) is None
    assert clear_checkpoints(tmp_path) == []
