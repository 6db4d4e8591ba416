"""The values a params key can take, where it is a choice: one registry for every reader.

A target's ``when: {convert.coco.head: seed}`` is only meaningful if ``seed`` is a value that
param can have: ``Seed`` would make the target silently apply to nothing. ``compare`` and the
gate check ``when`` values against this registry without importing the stage modules that
read those params. Params models use the same ``Literal`` types (e.g. ``head: Head``), so the
registry cannot drift from the validation; tests/stages/test_choices.py checks every entry
against the stage models until each of them uses these types.
"""
from __future__ import annotations

import fnmatch
import typing
from typing import Any, Literal

Head = Literal["seed", "gluoncv"]                 # convert.<branch>.head
CalibMode = Literal["naive", "entropy", "none"]    # quantize.<branch>.calib_mode
QuantizedDtype = Literal["auto", "int8", "uint8"]  # quantize.<branch>.quantized_dtype
Schedule = Literal["step", "cosine"]               # train.<branch>.schedule
Augment = Literal["gluoncv", "flip"]               # train.<branch>.augment
Weights = Literal["file", "trained"]               # convert.<branch>.weights
# The network registry's names (stages.models.NETWORKS has one builder per name; a test keeps
# the two equal). Kept here as plain names so validating params never imports the networks.
Network = Literal["ssd_300_vgg16_atrous_coco", "ssd_300_vgg16_atrous_voc", "demo_ssd"]

# Dotted params keys (``*`` stands for one key, e.g. the branch) -> the type of their values.
CHOICES: dict[str, Any] = {
    "convert.*.head": Head,
    "quantize.*.calib_mode": CalibMode,
    "quantize.*.quantized_dtype": QuantizedDtype,
    "train.*.schedule": Schedule,
    "train.*.augment": Augment,
    "convert.*.weights": Weights,
}
# Keys naming an entry of the network registry (see config.Section).
NETWORK_KEYS = ("convert.*.network", "train.*.network")


def allowed_values(key: str) -> tuple[Any, ...] | None:
    """The values the dotted params ``key`` may take, or None when it is not a choice."""
    for pattern, choice in CHOICES.items():
        if _matches(key, pattern):
            return typing.get_args(choice)
    if any(_matches(key, pattern) for pattern in NETWORK_KEYS):
        return tuple(sorted(typing.get_args(Network)))
    return None


def _matches(key: str, pattern: str) -> bool:
    parts, wanted = key.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w)
                                             for p, w in zip(parts, wanted))
