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
from stages.outputs import MARKER
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
    # deterministic (the default): MXNet's controls set before it was imported, recorded
    assert meta["provenance"]["determinism"] == {
        "deterministic": True, "environment": {"MXNET_ENFORCE_DETERMINISM": "1",
                                               "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0"}}
    assert "determinism controls" not in out + resumed.stderr
    # dvclive: every epoch once, the same values (the replayed part included), and no speed:
    # its git-tracked files, metrics.json (read by `dvc metrics diff`) included, are
    # byte-identical between the two runs
    for rel in ("metrics.json", *sorted(p.relative_to(clean_dir / "live").as_posix()
                                        for p in (clean_dir / "live").rglob("*.tsv"))):
        assert (clean_dir / "live" / rel).read_bytes() == (killed_dir / "live" / rel) \
            .read_bytes(), rel
    summary = json.loads((clean_dir / "live/metrics.json").read_text())
    assert "images_per_s" not in json.dumps(summary) and summary["step"] == 4
    curves = live_values(clean_dir / "live")
    assert "plots/metrics/train/images_per_s.tsv" not in curves
    assert [row.split("\t")[0] for row in curves["plots/metrics/train/loss.tsv"][1:]] == \
        ["1", "2", "3", "4"]
    assert len(curves["plots/metrics/val/map.tsv"]) == 1 + 2  # epochs 2 and 4
    # GluonCV's recipe lowers the loss too (the flip path: see above)
    losses = [float(row.split("\t")[1]) for row in curves["plots/metrics/train/loss.tsv"][1:]]
    assert losses[-1] < losses[0]
    # both completed: no checkpoint is left that a later run would resume from
    for d in (clean_dir, killed_dir):
        assert sorted(os.listdir(d / "model/ckpt")) == [MARKER]


def test_a_completed_run_leaves_nothing_to_resume_so_a_forced_rerun_retrains(
        devkit, tmp_path, monkeypatch, capfd):
    """`dvc repro -f train` after a completed run used to "resume" at the last epoch and finish
    in seconds; now the second run trains every epoch again, to the same bytes."""
    cwd, args = workdir(tmp_path, devkit, epochs=2, splits=[[2007, "train"]], val_interval=0)
    monkeypatch.chdir(cwd)
    outputs = ("metrics/train_voc.json", "model/trained/net.params", "model/trained/net.json",
               "live/metrics.json")
    assert run_stage(main, args) == 0
    first = {rel: (cwd / rel).read_bytes() for rel in outputs}
    assert sorted(os.listdir(cwd / "model/ckpt")) == [MARKER]
    capfd.readouterr()
    assert run_stage(main, args) == 0
    log = capfd.readouterr().err
    assert "stages.training: epoch 1/2:" in log and "stages.training: epoch 2/2:" in log
    assert "resuming" not in log
    assert {rel: (cwd / rel).read_bytes() for rel in outputs} == first
    # the per-epoch history the removed checkpoints held is in the model's provenance, without
    # the per-run speed (net.json above is byte-identical)
    history = json.loads(first["model/trained/net.json"])["provenance"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert not {"seconds", "images_per_s"} & {k for h in history for k in h}


def test_a_pretrained_base_file_is_an_input_recorded_with_its_digest(devkit, tmp_path,
                                                                     monkeypatch, capsys):
    """pretrained_base: true takes the base weights file from --pretrained-base (in the
    pipeline: fetch_weights' vgg16_atrous); its sha1 is in the provenance and in the resume
    key (checkpoints made from another base file are not resumed)."""
    import hashlib

    import mxnet as mx

    from stages.models import build_detector

    donor = build_detector("demo_ssd", CLASSES, None, seed=99)
    donor(mx.nd.zeros((1, 3, SIZE, SIZE)))
    donor.features.save_parameters(str(tmp_path / "base.params"))
    cwd, args = workdir(tmp_path / "run", devkit, epochs=1, splits=[[2007, "train"]],
                        val_interval=0, pretrained_base=True)
    monkeypatch.chdir(cwd)
    assert run_stage(main, args) == 2  # the flag is required with pretrained_base: true
    assert "train.voc.pretrained_base is True: --pretrained-base is required" in \
        capsys.readouterr().err
    assert run_stage(main, [*args, "--pretrained-base", str(tmp_path / "base.params")]) == 0
    meta = json.loads((cwd / "model/trained/net.json").read_text())["provenance"]
    assert meta["pretrained_base"] == hashlib.sha1(
        (tmp_path / "base.params").read_bytes()).hexdigest()
    (cwd / "params.yaml").write_text((cwd / "params.yaml").read_text().replace(
        "pretrained_base: true", "pretrained_base: false"))
    assert run_stage(main, [*args, "--pretrained-base", str(tmp_path / "base.params")]) == 2
    assert "pretrained_base is False: --pretrained-base must not be given" in \
        capsys.readouterr().err


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
    ({"deterministic": "yes"}, "train.voc.deterministic: Input should be a valid boolean"),
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
