"""Reading and validating ``params.yaml``: read once at a stage's entry, validated strictly.

Each stage declares the shape of its section as a pydantic model (a well-kept library that
already reports the key, the bad value and what is allowed); this module turns its errors into
one readable message and rejects unknown keys, so a typo in params.yaml is never ignored.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

PARAMS_FILE = "params.yaml"

# Every top-level section any params.yaml of this project may have (main and demo pipelines).
SECTIONS = ("data", "download", "unpack", "generate", "weights", "convert", "train", "quantize",
            "bf16", "evaluate", "compare", "plots")


class UsageError(ValueError):
    """A bad params value or command-line path, refused before any work (exit code 2)."""


class ParamsError(UsageError):
    """params.yaml is missing, unreadable, or has a key/value the stage cannot accept."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, no silent type coercion, and no
    ``.inf``/``.nan`` where a number is meant (``allow_inf_nan=False`` for every float field)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    # Every params field named ``network`` (train.voc.network, convert.coco.network, ...) names
    # an entry of the network registry (stages.choices.Network, the names of
    # stages.models.NETWORKS): checked here, at validation, so
    # an unknown name is a params error (exit 2) before any work, whichever stage reads it.
    @field_validator("network", mode="after", check_fields=False)
    @classmethod
    def _known_network(cls, name: Any) -> Any:
        if name is None:
            return name
        from stages.choices import Network  # lazily: choices is only needed for this check

        known = sorted(typing.get_args(Network))
        if name not in known:
            raise ValueError(f"unknown network {name!r}; known: {', '.join(known)}")
        return name


def named_entries(value: Any, example: str) -> Any:
    """For a params field that maps names to entries (compare.targets, data.<d>.archives): the
    list form of earlier versions is refused, saying what to write instead (a pydantic
    ``mode="before"`` validator calls this)."""
    if isinstance(value, list):
        raise ValueError(f"must be a mapping of name -> entry (e.g. `{example}`), not a list: "
                         "the name is what `dvc params diff` shows and what `dvc exp run -S` "
                         "sets (<section>.<name>.<field>=...)")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's SafeLoader, except that a key repeated in one mapping is an error.

    PyYAML keeps the last of two equal keys without a word, so a params.yaml with ``lr`` twice
    would silently run with the second value. Keys brought in by a ``<<`` merge may still be
    overridden: that is what merges are for.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line "
                        f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, refusing duplicate keys (see _UniqueKeyLoader)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


M = TypeVar("M", bound=BaseModel)


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Load params.yaml as a mapping and reject top-level sections nobody reads."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror})") from exc
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(SECTIONS)}")
    return data


def parse_section(data: dict[str, Any], section: str, model: type[M],
                  source: str = PARAMS_FILE) -> M:
    """Validate ``data[section]`` against ``model``; raise ParamsError naming every bad key."""
    if section not in data:
        raise ParamsError(f"{source}: missing section '{section}'")
    try:
        return model.model_validate(data[section])
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, section, model, source)) from None


def load_section(section: str, model: type[M], path: str | Path = PARAMS_FILE) -> M:
    """Read params.yaml and return its validated ``section`` (the usual stage entry call)."""
    return parse_section(read_params_file(path), section, model, str(path))


def load_branch(section: str, branch: str, model: type[M], path: str | Path = PARAMS_FILE) -> M:
    """Read params.yaml and return the validated ``section.<branch>`` (e.g. ``train.voc``).

    For sections keyed by branch (``train: {voc: {...}}``); errors name ``section.branch.key``.
    """
    data = read_params_file(path)
    if section not in data:
        raise ParamsError(f"{path}: missing section '{section}'")
    branches = data[section]
    if not isinstance(branches, dict) or branch not in branches:
        known = ", ".join(sorted(map(str, branches))) if isinstance(branches, dict) else "none"
        raise ParamsError(f"{path}: missing '{section}.{branch}' "
                          f"(branches in section '{section}': {known})")
    name = f"{section}.{branch}"
    return parse_section({name: branches[branch]}, name, model, str(path))


def format_errors(exc: ValidationError, section: str, model: type[BaseModel],
                  source: str = PARAMS_FILE) -> str:
    """One line per problem: ``source: section.key.sub: what is wrong (got value)``."""
    lines = [f"{source}: invalid params in section '{section}':"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([section, *loc])
        if loc and loc[-1] == "[key]":  # a mapping's key itself (a target's or archive's name)
            where = ".".join([section, *loc[:-2]])
            lines.append(f"  {where}: name {loc[-2]!r}: {err['msg']}")
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err['input']!r})")
    return "\n".join(lines)


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) model found at ``loc``; empty when it cannot be resolved."""
    current = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        else:  # list item index or dict key: step into the value type
            args = typing.get_args(current)
            if not args:
                return []
            current = args[-1]
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """Strip Optional[...] / Annotated[...] so nested models can be found."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            models = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp
