"""Train an SSD on Pascal VOC with GluonCV's recipe; checkpoint, resume, log curves with dvclive.

    python -m stages.train voc --data data/voc/VOCdevkit --out model/voc/trained \\
        --checkpoints model/voc/checkpoints --live dvclive/train_voc \\
        --metrics metrics/train_voc.json --speed metrics/speed_train_voc.json \\
        [--pretrained-base model/pretrained/vgg16_atrous.params]

Reads params ``train.<branch>``. The recipe is GluonCV's ``train_ssd.py`` (``stages/training.py``):
SGD with momentum, ``SSDMultiBoxLoss`` (hard negative mining 3:1), targets from
``SSDTargetGenerator``, either GluonCV's full SSD augmentation (``augment: gluoncv``) or a batched
horizontal flip only (``augment: flip``, for small CPU runs where the per-image augmentation
dominates wall time) (``stages/train_data.py``). Validation (VOC07 mAP every ``val_interval``
epochs) runs the evaluate stage's inference path.

Determinism and resume: every random choice is drawn from a generator seeded by
(seed, epoch[, image or batch]) — the shuffle order, the augmentation of each image, the flips
of each batch — so an epoch does not depend on the RNG history before it. A checkpoint (weights,
optimizer state, per-epoch history) is written every ``checkpoint_interval`` epochs; a rerun
after an interruption, with the same params, data and base weights, resumes from the latest one
and ends with the same weights and metrics as an uninterrupted run. Checkpoints of other
params/data/base weights are ignored (and replaced). A run that completes removes its
checkpoints once its outputs are written (published, for a distributed job), so a later run
(``dvc repro -f train``) trains from the start (``stages/checkpoints.py``). That identity is
tested on CPU (same machine, same thread count).
On GPU, cuDNN's autotuning and non-deterministic kernels make runs differ unless
``deterministic`` is true: it sets MXNet's determinism controls (``training.DETERMINISM_ENV``)
for this process before MXNet is imported, and so for its DataLoader workers (untested here:
no GPU).

Distributed (``distributed.kvstore: dist_sync | dist_device_sync``, ``stages/cluster.py``): this
same command checks the settings, then runs the training as a parameter-server job
(``stages/train_job.py``): a scheduler, servers and workers — each this module again, with
``--role`` — on this machine or over ssh; every worker trains on its part of each global batch,
the kvstore averages the gradients, worker 0 writes everything below. Off (``device`` |
``local``), the stage runs in this one process exactly as it always has.

Outputs: ``--out``: ``net.params`` + ``net.json`` (network, classes, data_shape, provenance
with the determinism controls in effect and the pretrained base's sha1); ``--metrics``: ``acc``
(anchor accuracy averaged over all training anchors, see ``train_metrics.summarize``), ``loss``
(last epoch), ``epochs``; ``--speed``: ``images_per_s`` (kept apart so identical reruns give
byte-identical accuracy files); ``--live``: dvclive curves of accuracy figures only, no speed
(rebuilt from the checkpoint history on resume, so they too match an uninterrupted run byte for
byte).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from stages.checkpoints import clear_checkpoints, fingerprint, is_checkpoint_entry
from stages.cluster import DistributedParams
from stages.common import (StageError, atomic_path, file_digest, library_versions, main_guard,
                           round_floats, seed_everything, write_json)
from stages.config import ParamsError, Section, load_branch
from stages.inference import configure_threads
from stages.live import is_live_entry, live_logger, open_live, remove_live
from stages.models import build_detector, check_input_size
from stages.outputs import check_outputs, claim_dir
from stages.parallel import Heartbeat, Solo, connect, exit_now_on_failure, exit_with_parent, serve
from stages.train_job import (CODE_ENV, FINGERPRINT_ENV, PARAMS_ENV, StagePaths, code_digest,
                              launch)
from stages.train_metrics import summarize
from stages.training import apply_determinism, contexts, fit
from stages.voc import VOC_CLASSES, Split, image_ids, labels, load_voc

log = logging.getLogger(__name__)

# Fields of an epoch's record that vary per run (kept out of every output but the speed file)
SPEED_FIELDS = ("seconds", "images_per_s")

Device = Literal["cpu"] | Annotated[int, Field(ge=0)]


class TrainParams(Section):
    """params.yaml ``train.<branch>``."""

    network: str = Field(min_length=1)
    # true: start from the base weights file given as --pretrained-base (the pipeline passes
    # GluonCV's ImageNet-pretrained VGG16-atrous, fetch_weights' output); false: random init
    pretrained_base: bool
    classes: Optional[list[Annotated[str, Field(pattern=r"^[a-z0-9_ -]+$")]]] = None
    splits: list[Split] = Field(min_length=1)
    val_split: Split
    data_shape: int = Field(ge=32, le=1024)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_decay: float = Field(gt=0, le=1)
    lr_decay_epochs: list[Annotated[int, Field(ge=1)]] = []
    schedule: Literal["step", "cosine"] = "step"
    warmup_epochs: int = Field(default=0, ge=0)
    momentum: float = Field(ge=0, lt=1)
    wd: float = Field(ge=0)
    augment: Literal["gluoncv", "flip"] = "gluoncv"
    devices: list[Device] = Field(min_length=1)
    num_workers: int = Field(ge=0)
    seed: int = Field(ge=0)
    checkpoint_interval: int = Field(ge=1)
    val_interval: int = Field(ge=0)
    val_max_images: int = Field(default=0, ge=0)
    # OpenMP threads on CPU (0 = all cores). CPU results depend on it (float reductions are
    # split by thread), so a reproducible CPU run pins it.
    threads: int = Field(default=0, ge=0)
    # MXNet's determinism controls for the training process and its workers (GPU: only
    # deterministic cuDNN algorithms, no autotuning); see training.apply_determinism
    deterministic: bool = True
    # One process (kvstore device | local), or a parameter-server job (stages/cluster.py).
    distributed: DistributedParams

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.lr_decay_epochs != sorted(set(self.lr_decay_epochs)):
            raise ValueError(f"lr_decay_epochs must be strictly increasing "
                             f"(got {self.lr_decay_epochs})")
        if "cpu" in self.devices and self.devices != ["cpu"]:
            raise ValueError(f"devices must be ['cpu'] or a list of GPU ids (got {self.devices})")
        if len(set(map(str, self.devices))) != len(self.devices):
            raise ValueError(f"devices must not repeat (got {self.devices})")
        if self.batch_size % len(self.devices):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number "
                             f"of devices ({len(self.devices)})")
        shares = self.distributed.workers * len(self.devices)
        if self.batch_size % shares:  # each worker takes an equal part of every global batch
            raise ValueError(f"batch_size {self.batch_size} (the global batch) must be a "
                             f"multiple of distributed.workers x devices ({shares}): more "
                             "workers than equal shares of a batch")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique (got {self.classes})")
        if self.warmup_epochs >= self.epochs and self.schedule == "cosine":
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs "
                             f"({self.epochs}) for the cosine schedule")
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("branch", help="params branch: reads train.<branch>")
    parser.add_argument("--data", required=True, type=Path, help="VOCdevkit root")
    parser.add_argument("--out", required=True, type=Path, help="trained model directory")
    parser.add_argument("--checkpoints", required=True, type=Path,
                        help="persistent checkpoint directory (resume source)")
    parser.add_argument("--live", required=True, type=Path, help="dvclive directory")
    parser.add_argument("--metrics", required=True, type=Path, help="training metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="training speed json")
    parser.add_argument("--pretrained-base", type=Path,
                        help="base network weights file (with params pretrained_base: true)")
    # set by the distributed launcher (stages/train_job.py) for the processes of the job
    parser.add_argument("--role", choices=("scheduler", "server", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role in ("scheduler", "server"):
        serve()  # ends the process when the job is over
    if args.role == "worker":
        exit_with_parent()
        return exit_now_on_failure(lambda: train(args, worker_params()))
    for name in [k for k in os.environ if k.startswith("DMLC_")]:  # MXNet would act on them
        log.warning("ignoring %s from the environment (the launcher sets the roles)", name)
        del os.environ[name]
    p = load_branch("train", args.branch, TrainParams)
    if p.pretrained_base != (args.pretrained_base is not None):
        need = "is required" if p.pretrained_base else "must not be given"
        raise ParamsError(f"train.{args.branch}.pretrained_base is {p.pretrained_base}: "
                          f"--pretrained-base {need}")
    check_outputs(files={"--metrics": args.metrics, "--speed": args.speed},
                  dirs={"--out": args.out},
                  own_dirs={"--checkpoints": args.checkpoints, "--live": args.live},
                  inputs={"--data": args.data, "--pretrained-base": args.pretrained_base or []})
    code = train(args, p)
    clear_checkpoints(args.checkpoints)  # outputs published: a completed run leaves nothing
    return code                          # to resume from, so a forced rerun trains again


def worker_params() -> TrainParams:
    """The launcher's validated params (identical on every host, whatever its params.yaml)."""
    try:
        return TrainParams.model_validate_json(os.environ[PARAMS_ENV])
    except (KeyError, ValueError) as exc:
        raise ParamsError(f"a worker needs the launcher's params in {PARAMS_ENV} ({exc})") from None


def claim_outputs(args: argparse.Namespace) -> None:
    """Take the directories the stage writes into (created, or checked to hold only ours)."""
    claim_dir(args.checkpoints, "--checkpoints", is_checkpoint_entry)
    claim_dir(args.live, "--live", is_live_entry)


def train(args: argparse.Namespace, p: TrainParams) -> int:
    """Train in this process (alone, or as worker ``args.rank``), or launch the job."""
    dist, worker = p.distributed, args.role == "worker"
    configure_threads(p.threads)  # before MXNet is imported: OpenMP reads it once
    determinism = apply_determinism(p.deterministic)  # likewise, and workers inherit it
    seed_everything(p.seed)
    classes = tuple(p.classes or VOC_CLASSES)
    train_set = load_voc(args.data, p.splits, classes)
    indices = [i for i, lab in enumerate(labels(train_set)) if len(lab)]
    if not indices:
        raise StageError(f"no image of {p.splits} under {args.data} has an object of {classes}")
    if len(indices) < len(train_set):
        log.warning("skipping %d training images without objects", len(train_set) - len(indices))
    ids = [image_ids(train_set)[i] for i in indices]
    digest = fingerprint(p.model_dump(), classes, ids)
    if dist.enabled and not worker:
        paths = StagePaths(args.data, args.out, args.checkpoints, args.live, args.metrics,
                           args.speed, args.pretrained_base)
        try:
            launch(args.branch, paths, p.model_dump_json(), dist, p.threads, len(indices),
                   digest, claim=lambda: claim_outputs(args))
        except BaseException:
            remove_live(args.live)  # as below: no partial curves (the job wrote none here)
            raise
        return 0
    if worker and os.environ.get(CODE_ENV) != code_digest():
        raise StageError(f"worker {args.rank}: its code (stages/*.py in {os.getcwd()}) differs "
                         "from the launcher's; every host needs the same checkout")
    if worker and digest != os.environ.get(FINGERPRINT_ENV):
        raise StageError(f"worker {args.rank}: its training images under {args.data} (or its "
                         "params) differ from the launcher's; every host needs the same data "
                         "(shared storage, or dvc pull on each host)")
    group = connect(dist.kvstore, args.rank, dist.workers) if worker else Solo(dist.kvstore)
    lead = group.rank == 0
    if lead:  # worker 0's --live is the launcher's temporary path; the others write nothing
        claim_outputs(args)
    ctx = contexts(p.devices)
    val_set = load_voc(args.data, [p.val_split], classes) if p.val_interval and lead else None
    log.info("training %s on %d images of %s for %d epochs on %s%s", p.network, len(indices),
             p.splits, p.epochs, ctx, f" (worker {group.rank} of {group.size})" if worker else "")
    # Workers start from worker 0's weights (checkpoints.restore): only worker 0 needs the
    # pretrained base file, the other hosts only the data.
    net = build_detector(p.network, classes, args.pretrained_base if lead else None, p.seed)
    check_input_size(net, p.data_shape)
    # The resume key: params and data (``digest``, which every worker checks) and the base
    # weights' content, so a checkpoint made from another base file is never resumed.
    base = {"pretrained_base": file_digest(args.pretrained_base, "sha1")} \
        if lead and p.pretrained_base else {}
    resume_key = fingerprint(p.model_dump(), classes, ids, base) if base else digest
    beat = Heartbeat(dist.progress_timeout_s / 4) if worker else None
    progress = (lambda e, b: beat(lambda: f"epoch {e + 1}/{p.epochs}, batch {b + 1}")) \
        if beat else None
    live = open_live(args.live) if lead else None
    try:
        history = fit(net, train_set, indices, val_set, p, classes, ctx, args.checkpoints,
                      resume_key, live_logger(live) if live else lambda r: None, group,
                      progress)
        if live:
            live.end()
    except BaseException:
        if lead:
            remove_live(args.live)  # nothing partial is left behind (only dvclive's own files)
        raise
    if lead:
        write_outputs(args, p, net, classes, ids, digest, history, determinism, base)
    return 0


def write_outputs(args, p: TrainParams, net, classes, ids, digest: str, history,
                  determinism: dict, base: dict) -> None:
    """The trained model (with provenance: ``base`` holds the pretrained base's sha1, and the
    per-epoch history without its speed fields), the metrics and the speed file."""
    metrics = summarize(history)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        net.save_parameters(str(tmp / "net.params"))
        write_json(tmp / "net.json", {
            "network": p.network, "classes": list(classes), "data_shape": p.data_shape,
            "provenance": {"params": {f"train.{args.branch}": p.model_dump()},
                           "images": len(ids), "fingerprint": digest, **base,
                           "determinism": {"deterministic": p.deterministic,
                                           "environment": determinism},
                           # accuracy only: the file must not change between identical reruns
                           "metrics": round_floats({k: metrics[k] for k in ("acc", "loss")}),
                           # per epoch (the completed run's checkpoints are removed)
                           "history": round_floats([{k: v for k, v in h.items()
                                                     if k not in SPEED_FIELDS}
                                                    for h in history]),
                           "libraries": library_versions()},
        })
    speed = {"images_per_s": metrics.pop("images_per_s")}
    write_json(args.metrics, round_floats(metrics))
    write_json(args.speed, round_floats(speed))
    log.info("trained %d epochs: anchor acc %.4f (training average), final loss %.4f, "
             "%.1f img/s; model in %s", metrics["epochs"], metrics["acc"], metrics["loss"],
             speed["images_per_s"], args.out)


if __name__ == "__main__":
    main_guard(main)
