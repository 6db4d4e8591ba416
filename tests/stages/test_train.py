"""The train stage: GluonCV SSD training on a tiny generated VOC set, with the demo's small SSD.

Real MXNet/GluonCV/dvclive throughout; the resume test kills a real training process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.common import StageError, run_stage
from stages.train import (TrainParams, anchor_accuracy, build_detector, epoch_batches, fit,
                          learning_rate, main, summarize)

CLASSES = ["rectangle", "ellipse", "triangle"]
SIZE = 128  # the demo SSD's base size


def train_params(**overrides) -> dict:
    """A small train.voc section: demo SSD, 64 px, few images and epochs."""
    params = {
        "network": "demo_ssd", "pretrained_base": "none", "classes": CLASSES,
        "splits": [[2007, "trainval"]], "val_split": [2007, "test"], "data_shape": SIZE,
        "batch_size": 8, "epochs": 5, "lr": 0.05, "lr_decay": 0.1, "lr_decay_epochs": [4],
        "schedule": "step", "warmup_epochs": 1, "momentum": 0.9, "wd": 0.0005,
        "augment": "flip", "devices": ["cpu"], "num_workers": 0, "seed": 11,
        "checkpoint_interval": 1, "val_interval": 2, "val_max_images": 0,
    }
    params.update(overrides)
    return params


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2007: 32 trainval images (its first 16 also as 'train'), 8 test images."""
    from stages.generate import make_samples, write_voc

    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    train = make_samples(32, CLASSES, SIZE, 3, seed=5)
    test = make_samples(8, CLASSES, SIZE, 3, seed=5, first_index=32)
    write_voc(root, 2007, {"trainval": train, "train": train[:16], "test": test}, CLASSES)
    return root


def workdir(tmp_path: Path, devkit: Path, **overrides) -> tuple[Path, list[str]]:
    """A cwd with params.yaml (train.voc) and the stage's CLI arguments for it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"voc": train_params(**overrides)}}))
    args = ["voc", "--data", str(devkit), "--out", "model/trained", "--checkpoints", "model/ckpt",
            "--live", "live", "--metrics", "metrics/train_voc.json",
            "--speed", "metrics/speed_train_voc.json"]
    return tmp_path, args


def cli(cwd: Path, args: list[str], **kw) -> subprocess.Popen:
    """Start the real stage CLI (own process group, so a kill takes its workers too)."""
    return subprocess.Popen([sys.executable, "-m", "stages.train", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def live_values(live: Path) -> dict[str, list[str]]:
    """dvclive tsv contents without the timestamp column (step and value per row)."""
    out = {}
    for tsv in sorted(live.rglob("*.tsv")):
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        header = rows[0]
        keep = [i for i, name in enumerate(header) if name != "timestamp"]
        out[str(tsv.relative_to(live))] = ["\t".join(r[i] for i in keep) for r in rows]
    return out


# ---------------------------------------------------------------------------------------------
# Pure pieces

def test_anchor_accuracy_uses_exactly_the_loss_mask():
    import mxnet as mx
    from gluoncv.loss import SSDMultiBoxLoss

    rng = np.random.RandomState(0)
    b, n, c = 3, 200, 4
    cls_pred = mx.nd.array(rng.normal(0, 2, (b, n, c)))
    target = np.zeros((b, n), np.float32)
    for i, k in enumerate((5, 1, 12)):  # a few positives per image
        target[i, rng.choice(n, k, replace=False)] = rng.randint(1, c, k)
    cls_target = mx.nd.array(target)
    box = mx.nd.zeros((b, n, 4))
    _, cls_losses, _ = SSDMultiBoxLoss()(cls_pred, box, cls_target, box)

    # Recompute the loss over our mask: it must equal GluonCV's (mask = positives + mined negatives).
    ce = -mx.nd.pick(mx.nd.log_softmax(cls_pred, axis=-1), cls_target, axis=-1).asnumpy()
    pos = target > 0
    masked = []
    for i in range(b):
        negatives = np.argsort(-np.where(pos[i], -np.inf, ce[i]))[: 3 * pos[i].sum()]
        mask = pos[i].copy()
        mask[negatives] = True
        masked.append(ce[i][mask].sum() / pos.sum())
    np.testing.assert_allclose(cls_losses[0].asnumpy(), masked, rtol=1e-5)

    correct, counted = anchor_accuracy(cls_pred, cls_target)
    assert counted == 4 * pos.sum()  # 18 positives + 54 hard negatives
    expected = sum(((np.argmax(cls_pred.asnumpy()[i], -1) == target[i])
                    & (pos[i] | np.isin(np.arange(n), np.argsort(-np.where(pos[i], -np.inf, ce[i]))
                                        [: 3 * pos[i].sum()]))).sum() for i in range(b))
    assert correct == expected
    # A perfect classifier is right on every counted anchor (ties make the mined set differ).
    right, seen = anchor_accuracy(mx.nd.one_hot(cls_target, c) * 20, cls_target)
    assert right == seen >= pos.sum()


def test_epoch_order_is_a_seeded_full_cover():
    a = epoch_batches(10, 4, seed=1, epoch=3)
    assert a == epoch_batches(10, 4, seed=1, epoch=3)
    assert a != epoch_batches(10, 4, seed=1, epoch=4)
    assert [len(x) for x in a] == [4, 4, 4] and set(sum(a, [])) == set(range(10))
    assert len(epoch_batches(3, 8, seed=1, epoch=0)[0]) == 8  # fewer images than a batch


def test_learning_rate_schedules():
    p = TrainParams.model_validate(train_params(epochs=10, lr=0.1, lr_decay_epochs=[4, 8],
                                                warmup_epochs=2))
    assert learning_rate(p, 0, 5) == pytest.approx(0.01)  # warmup: 1/10 of the way
    assert learning_rate(p, 9, 5) == pytest.approx(0.1)
    assert learning_rate(p, 4 * 5, 5) == pytest.approx(0.01)
    assert learning_rate(p, 8 * 5, 5) == pytest.approx(0.001)
    cos = TrainParams.model_validate({**p.model_dump(), "schedule": "cosine"})
    assert learning_rate(cos, 10, 5) == pytest.approx(0.1)  # right after warmup
    assert learning_rate(cos, 49, 5) < 0.001


def test_summary_averages_over_all_anchors():
    history = [{"epoch": 1, "correct": 1, "counted": 4, "loss": 9.0, "images": 8, "seconds": 2.0},
               {"epoch": 2, "correct": 9, "counted": 12, "loss": 3.0, "images": 8, "seconds": 2.0}]
    assert summarize(history) == {"acc": 10 / 16, "loss": 3.0, "epochs": 2, "images_per_s": 4.0}


# ---------------------------------------------------------------------------------------------
# Training

def test_a_few_epochs_lower_the_loss(devkit, tmp_path):
    """Flip-only path, in process: loss falls, anchor accuracy rises, mAP computed at the end."""
    import mxnet as mx

    from stages.voc import load_voc

    p = TrainParams.model_validate(train_params(epochs=4, val_interval=4, lr_decay_epochs=[]))
    train_set = load_voc(str(devkit), p.splits, CLASSES)
    val_set = load_voc(str(devkit), [p.val_split], CLASSES)
    net = build_detector(p.network, CLASSES, p.pretrained_base, p.seed)
    history = fit(net, train_set, range(len(train_set)), val_set, p, CLASSES, [mx.cpu()],
                  tmp_path / "ckpt", "digest", on_epoch=lambda r: None)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["anchor_acc"] > history[0]["anchor_acc"]
    assert 0.0 <= history[-1]["map"] <= 100.0 and "map" not in history[0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch-0004.json", "epoch-0004.params", "epoch-0004.states"]


def test_interrupted_run_resumes_to_the_same_result(devkit, tmp_path):
    """Kill a real run after its 2nd checkpoint; the rerun resumes and matches a clean run.

    GluonCV's full augmentation in 2 DataLoader worker processes: per-image seeding must make
    it independent of which worker draws what, and of the interruption.
    """
    overrides = dict(augment="gluoncv", num_workers=2, epochs=4, splits=[[2007, "train"]],
                     lr=0.02, warmup_epochs=0, lr_decay_epochs=[3])
    clean_dir, args = workdir(tmp_path / "clean", devkit, **overrides)
    killed_dir, _ = workdir(tmp_path / "killed", devkit, **overrides)
    clean = cli(clean_dir, args)
    victim = cli(killed_dir, args)
    ckpt = killed_dir / "model/ckpt/epoch-0002.json"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, f"run ended before it could be interrupted:\n{victim.stdout.read()}"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / "model/trained").exists()
    assert not (killed_dir / "metrics/train_voc.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=killed_dir,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    done = int(resumed.stderr.split("resuming from checkpoint after epoch ")[1].split("/")[0])
    assert 2 <= done < 4
    out, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, out

    a, b = ((d / "metrics/train_voc.json").read_bytes() for d in (clean_dir, killed_dir))
    assert a == b  # accuracy file byte-identical; the speed lives in its own file
    a = json.loads(a)
    assert sorted(a) == ["acc", "epochs", "loss"]
    assert a["epochs"] == 4 and 0 < a["acc"] <= 1 and a["loss"] > 0
    speed = json.loads((killed_dir / "metrics/speed_train_voc.json").read_text())
    assert sorted(speed) == ["images_per_s"] and speed["images_per_s"] > 0
    assert (clean_dir / "model/trained/net.params").read_bytes() == \
        (killed_dir / "model/trained/net.params").read_bytes()
    meta = json.loads((clean_dir / "model/trained/net.json").read_text())
    assert (meta["network"], meta["classes"], meta["data_shape"]) == ("demo_ssd", CLASSES, SIZE)
    # dvclive curves: every epoch once, the same values (the replayed part included); the
    # speed differs between runs, of course
    curves, again = live_values(clean_dir / "live"), live_values(killed_dir / "live")
    speed = "plots/metrics/train/images_per_s.tsv"
    assert len(curves.pop(speed)) == len(again.pop(speed)) == 1 + 4
    assert curves == again
    assert [row.split("\t")[0] for row in curves["plots/metrics/train/loss.tsv"][1:]] == \
        ["1", "2", "3", "4"]
    assert len(curves["plots/metrics/val/map.tsv"]) == 1 + 2  # epochs 2 and 4
    # GluonCV's recipe lowers the loss too (the flip path: see above)
    history = json.loads(next((clean_dir / "model/ckpt").glob("*.json")).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_non_finite_loss_stops_with_a_clear_error(devkit, tmp_path, monkeypatch, capsys):
    cwd, args = workdir(tmp_path, devkit, lr=1e9, warmup_epochs=0, epochs=2)
    monkeypatch.chdir(cwd)
    assert run_stage(main, args) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "at epoch 1, batch" in err and "lr 1e+09" in err
    assert not (cwd / "model/trained").exists() and not (cwd / "live").exists()
    assert not (cwd / "metrics").exists()


@pytest.mark.parametrize("override, needle", [
    ({"lr": -1.0}, "train.voc.lr: Input should be greater than 0"),
    ({"augment": "mosaic"}, "train.voc.augment: Input should be 'gluoncv' or 'flip'"),
    ({"devices": ["cpu", 0]}, "devices must be ['cpu'] or a list of GPU ids"),
    ({"splits": [[2007, "trianval"]]}, "train.voc.splits.0.1"),
    ({"lr_decay_epochs": [200, 160]}, "lr_decay_epochs must be strictly increasing"),
    ({"learning_rate": 0.1}, "train.voc.learning_rate: unknown key"),
])
def test_bad_params_exit_2_before_any_work(devkit, tmp_path, monkeypatch, capsys, override, needle):
    cwd, args = workdir(tmp_path, devkit, **override)
    monkeypatch.chdir(cwd)
    assert run_stage(main, args) == 2
    assert needle in capsys.readouterr().err
    assert list(cwd.iterdir()) == [cwd / "params.yaml"]


def test_missing_branch_and_missing_data_fail_clearly(devkit, tmp_path, monkeypatch, capsys):
    cwd, args = workdir(tmp_path, devkit)
    monkeypatch.chdir(cwd)
    assert run_stage(main, ["coco", *args[1:]]) == 2
    assert "missing 'train.coco' (branches in section 'train': voc)" in capsys.readouterr().err
    args[2] = str(tmp_path / "nowhere")
    assert run_stage(main, args) == 1
    assert "cannot read VOC split(s)" in capsys.readouterr().err


def test_local_base_file_that_matches_nothing_is_refused(tmp_path):
    import mxnet as mx

    mx.nd.save(str(tmp_path / "base.params"), {"unrelated_weight": mx.nd.zeros((1,))})
    with pytest.raises(StageError, match="none of its 1 arrays matches"):
        build_detector("demo_ssd", CLASSES, str(tmp_path / "base.params"), seed=0)
