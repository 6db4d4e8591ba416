"""The stages of a dvc.yaml as DVC resolves them: foreach expanded, templates filled in."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.tools.imports import DepsError

CMD_MODULE = re.compile(r"(?:^|\s)python3?\s+-m\s+(\S+)")
TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")


@dataclass
class Stage:
    """One stage of a dvc.yaml as DVC resolves it (``group@item`` for foreach stages)."""

    name: str
    group: str  # the key under ``stages:`` (the foreach stage for its items)
    module: str | None  # the ``python -m`` module of its cmd, None if it runs none
    deps: list[str]


def resolve(text: str, context: dict) -> str:
    """``${name}`` templates replaced from ``context`` (dotted names look into mappings)."""
    def value(match: re.Match) -> str:
        current = context
        for part in match.group(1).split("."):
            if not isinstance(current, dict) or part not in current:
                return match.group(0)  # unresolved: left as written
            current = current[part]
        return str(current)

    return TEMPLATE.sub(value, text)


def load_stages(dvc_yaml: Path) -> list[Stage]:
    """The stages of ``dvc_yaml``, foreach stages expanded, cmd and deps templates resolved
    from its ``vars`` mappings and the item."""
    try:
        data = yaml.safe_load(dvc_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DepsError(f"cannot read {dvc_yaml}: {exc}") from exc
    context: dict = {}
    for entry in data.get("vars", []):
        if isinstance(entry, dict):
            context.update(entry)
    stages = []
    for group, body in (data.get("stages") or {}).items():
        if "foreach" in body:
            items = resolve_items(body["foreach"], context)
            for key, item in items:
                local = {**context, "item": item, "key": key}
                stages.append(make_stage(f"{group}@{key}", group, body["do"], local))
        else:
            stages.append(make_stage(group, group, body, context))
    return stages


def resolve_items(foreach, context: dict) -> list[tuple[str, object]]:
    """(key, item) pairs of a foreach: a list (key = item), a mapping, or a ``${var}``."""
    if isinstance(foreach, str):
        name = TEMPLATE.fullmatch(foreach.strip())
        foreach = context.get(name.group(1)) if name else None
    if isinstance(foreach, dict):
        return [(str(k), v) for k, v in foreach.items()]
    if isinstance(foreach, list):
        return [(str(v), v) for v in foreach]
    raise DepsError(f"foreach {foreach!r}: expected a list, a mapping or a ${{var}} naming one")


def make_stage(name: str, group: str, body: dict, context: dict) -> Stage:
    cmd = body.get("cmd", "")
    cmd = resolve(" ".join(cmd) if isinstance(cmd, list) else str(cmd), context)
    match = CMD_MODULE.search(cmd)
    deps = [resolve(str(d if not isinstance(d, dict) else next(iter(d))), context)
            for d in body.get("deps") or []]
    return Stage(name, group, match.group(1) if match else None, deps)
