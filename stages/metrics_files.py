"""Metrics files as compare and the gate read them: flat JSON objects, one value per name.

A metric is named ``<file>.<key>``: ``coco_fp32.map`` is key ``map`` of the metrics file whose
name (without ``.json``) is ``coco_fp32``; nested keys are joined with dots, as DVC shows them.
Fails closed: a file that is missing, not valid JSON or not a JSON object, and a value that is
not a finite number, are reported with why they cannot be judged, never as a value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from stages.common import StageError


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, the way ``dvc metrics show`` names them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def lookup_metric(metrics: Mapping[str, Any], name: str) -> tuple[float | None, str]:
    """Value of metric ``file.key``, or None and why it cannot be judged.

    ``metrics`` maps a metrics file's name to its flattened content, or to a string saying why
    the file could not be read.
    """
    stem, key = name.split(".", 1)
    content = metrics.get(stem)
    if content is None:
        return None, f"no metrics file {stem!r}"
    if isinstance(content, str):
        return None, content
    if key not in content:
        return None, f"key {key!r} missing in {stem!r}"
    value = content[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name} is not a number ({value!r})"
    if not math.isfinite(value):
        return None, f"{name} is not finite ({value})"
    return float(value), ""


def parse_metrics(text: str, source: str) -> dict[str, Any] | str:
    """A metrics file's flattened JSON object, or a string saying why it cannot be used."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"{source} is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return f"{source} does not hold a JSON object"
    return flatten(data)


def read_metrics_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Map each file's name (stem) to its flattened JSON, or to why it cannot be read."""
    metrics: dict[str, Any] = {}
    for path in map(Path, paths):
        if path.stem in metrics:
            raise StageError(f"two metrics files are both named {path.stem!r}; "
                             "metric names need unique file names")
        try:
            metrics[path.stem] = parse_metrics(path.read_text(), str(path))
        except OSError as exc:
            metrics[path.stem] = f"cannot read {path} ({exc.strerror})"
        except UnicodeDecodeError as exc:
            metrics[path.stem] = f"{path} is not valid JSON ({exc})"
    return metrics
