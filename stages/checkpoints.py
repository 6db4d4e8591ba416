"""Training checkpoints: what makes one valid for a run (``fingerprint``), writing and finding.

A checkpoint after epoch E is ``epoch-EEEE.params`` (weights), ``.states`` (optimizer state) and
``.json`` (epoch, fingerprint, per-epoch history), the json written last so it marks the
checkpoint complete. A run resumes from the latest complete checkpoint with its fingerprint.
Checkpoints are resume state for an interrupted run only: a run that completes removes them
(``clear_checkpoints``) once its outputs are written, so a forced rerun trains from the start.
In a data-parallel job only worker 0 reads and writes them; ``restore`` hands its starting
state to the other workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from stages.common import atomic_path, write_json

log = logging.getLogger(__name__)

# Params that do not change the training trajectory: a checkpoint stays valid across them.
NOT_IN_FINGERPRINT = ("num_workers", "checkpoint_interval", "val_interval", "val_split",
                      "val_max_images")


def fingerprint(params: Mapping[str, Any], classes: Sequence[str], ids: Sequence[str],
                inputs: Mapping[str, str] | None = None) -> str:
    """Digest of everything that shapes the training trajectory (params, classes, image list,
    and the digests of input files such as the pretrained base weights).

    ``params``: the train params as a mapping (``model_dump()``). ``epochs`` only matters for
    the cosine schedule (an interrupted step schedule run may be resumed with more epochs); of
    ``distributed``, only ``workers`` when above 1.
    """
    knobs = {k: v for k, v in params.items() if k not in NOT_IN_FINGERPRINT}
    # Of the distributed settings only the number of workers shapes the trajectory (BatchNorm
    # statistics and loss normalisation are per worker); one worker computes exactly what one
    # process does, so its checkpoints are interchangeable with a single-process run's.
    workers = knobs.pop("distributed", {}).get("workers", 1)
    if workers > 1:
        knobs["workers"] = workers
    if knobs["schedule"] != "cosine":
        knobs.pop("epochs")
    blob = json.dumps({"params": knobs, "classes": list(classes), "images": list(ids),
                       **({"inputs": dict(inputs)} if inputs else {})},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_checkpoint_entry(entry) -> bool:
    """A file this module writes in the checkpoint directory (or its temp file)."""
    name = entry.name
    return entry.is_file(follow_symlinks=False) and (
        re.fullmatch(r"epoch-\d{4}\.(params|states|json)", name) is not None
        or re.fullmatch(r"\.epoch-\d{4}\.(params|states|json)\.\w+\.tmp", name) is not None)


def checkpoint_paths(directory: Path, epoch: int) -> dict[str, Path]:
    """The three files of the checkpoint after ``epoch`` epochs."""
    stem = directory / f"epoch-{epoch:04d}"
    return {k: stem.with_suffix(f".{k}") for k in ("params", "states", "json")}


def save_checkpoint(directory: Path, net, trainer, history: list[dict], digest: str) -> None:
    """Write weights, optimizer state, then the json that makes the checkpoint count.

    Older checkpoints (and stale ones of other params) are removed once it is complete.
    """
    epoch = history[-1]["epoch"]
    paths = checkpoint_paths(directory, epoch)
    with atomic_path(paths["params"]) as tmp:
        net.save_parameters(str(tmp))
    with atomic_path(paths["states"]) as tmp:
        trainer.save_states(str(tmp))
    write_json(paths["json"], {"epoch": epoch, "fingerprint": digest, "history": history})
    keep = set(paths.values())
    for old in directory.glob("epoch-*"):
        if old not in keep:
            old.unlink()


def clear_checkpoints(directory: Path) -> list[Path]:
    """Remove every checkpoint file (and temp file) of this module from ``directory``; returns
    them. Nothing else there is touched (the train stage claimed the directory at its entry)."""
    removed = []
    if not directory.is_dir():
        return removed
    with os.scandir(directory) as entries:
        for entry in entries:
            if is_checkpoint_entry(entry):
                removed.append(Path(entry.path))
    for path in sorted(removed):
        path.unlink()
    if removed:
        log.info("training complete: removed its %d checkpoint files from %s (a later run "
                 "starts from scratch)", len(removed), directory)
    return removed


def find_checkpoint(directory: Path, digest: str, epochs: int) -> Optional[dict]:
    """The latest complete checkpoint made with ``digest`` and at most ``epochs`` epochs."""
    for leftover in directory.glob(".epoch-*.tmp"):  # a killed run's partial file
        leftover.unlink()
    for meta_path in sorted(directory.glob("epoch-*.json"), reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        paths = checkpoint_paths(directory, int(meta.get("epoch", -1)))
        if (meta.get("fingerprint") == digest and meta["epoch"] <= epochs
                and paths["params"].is_file() and paths["states"].is_file()):
            return {**meta, "paths": paths}
        log.warning("ignoring checkpoint %s: made with other params/data (or more epochs)",
                    meta_path)
    return None


def restore(group, net, trainer, found: Optional[dict], ctx: list) -> list[dict]:
    """Put the starting state into ``net`` and ``trainer``; returns the history to continue.

    One process: the checkpoint ``found`` (if any) is loaded, as always. Workers of a job
    (``stages.parallel.KVGroup``): worker 0, the only one reading the checkpoint directory,
    sends its weights, optimizer state and history to the others, so all start from the same
    state — on a fresh start too, so nothing a host did differently (a pretrained base from its
    own cache) can make the workers differ.
    """
    if group.rank == 0 and found:
        net.load_parameters(str(found["paths"]["params"]), ctx=ctx)
        trainer.load_states(str(found["paths"]["states"]))
    history = list(found["history"]) if found else []
    if group.size == 1:
        return history
    with tempfile.TemporaryDirectory(prefix="ssd-repro-restore-") as tmp:
        params, states = Path(tmp) / "start.params", Path(tmp) / "start.states"
        blob = None
        if group.rank == 0:
            net.save_parameters(str(params))
            state_bytes = found["paths"]["states"].read_bytes() if found else b""
            header = json.dumps({"history": history, "states": len(state_bytes)}).encode()
            blob = b"\n".join([header, state_bytes + params.read_bytes()])
        header, _, rest = group.broadcast_bytes(blob).partition(b"\n")
        meta = json.loads(header)
        if group.rank != 0:
            states.write_bytes(rest[:meta["states"]])
            params.write_bytes(rest[meta["states"]:])
            net.load_parameters(str(params), ctx=ctx)
            if meta["states"]:
                trainer.load_states(str(states))
    return meta["history"]
