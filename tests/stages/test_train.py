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

import pytest
import yaml

from stages.common import run_stage
from stages.train import main
from tests.stages.train_helpers import CLASSES, SIZE, train_params, write_devkit


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return write_devkit(tmp_path_factory.mktemp("voc"))


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
# The stage, run for real

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


@pytest.mark.parametrize("flag, make", [
    ("--live", lambda cwd: "."),
    ("--out", lambda cwd: str(cwd)),
    ("--checkpoints", lambda cwd: (cwd / "ckpt").mkdir() or
     (cwd / "ckpt" / "notes.txt").write_text("mine") and "ckpt"),
    ("--metrics", lambda cwd: (cwd / "m.json").mkdir() or "m.json"),
])
def test_outputs_it_does_not_own_are_refused_before_any_work(devkit, tmp_path, monkeypatch,
                                                             capsys, flag, make):
    cwd, args = workdir(tmp_path, devkit)
    monkeypatch.chdir(cwd)
    args[args.index(flag) + 1] = make(cwd)
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    assert run_stage(main, args) == 2
    assert f"{flag} " in capsys.readouterr().err
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before
