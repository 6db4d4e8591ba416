"""Both params files hold every knob: each field of each params model, in each section and branch
(nested models, lists and named mappings of models included), so `dvc exp run -S key=value`
works for every key (DVC refuses to set a key the file does not have) and no behaviour hides in
a code default."""
from __future__ import annotations

import types
import typing

import pytest
import yaml
from pydantic import BaseModel

from stages.config import SECTIONS, parse_section
from stages.convert import ConvertParams
from stages.convert_bf16 import Bf16Params
from stages.data_params import Dataset
from stages.download import DownloadParams
from stages.evaluate_coco import EvaluateParams
from stages.evaluate_voc import EvaluateVocParams
from stages.fetch_weights import WeightsParams
from stages.generate import GenerateParams
from stages.quantize import QuantizeParams
from stages.targets import CompareParams
from stages.train import TrainParams
from stages.unpack import UnpackParams

# params path (``*`` = any branch) -> the model the stage reading it validates it with
MODELS: dict[str, type[BaseModel]] = {
    "data.*": Dataset, "download": DownloadParams, "unpack": UnpackParams,
    "generate": GenerateParams, "weights.*": WeightsParams, "train.*": TrainParams,
    "convert.*": ConvertParams, "quantize.*": QuantizeParams, "bf16.*": Bf16Params,
    "evaluate.coco": EvaluateParams, "evaluate.voc": EvaluateVocParams,
    "compare": CompareParams,
}
# Sections only one pipeline has, and why.
ONLY_IN = {
    "generate": "demo/params.yaml",  # the real pipeline downloads the real datasets
    "weights": "params.yaml",        # the demo's network trains from scratch: no pretrained file
}
FILES = ("params.yaml", "demo/params.yaml")


def load(repo_root, name: str) -> dict:
    return yaml.safe_load((repo_root / name).read_text())


def entries(data: dict) -> dict[str, tuple[type[BaseModel], object]]:
    """params path -> (model, value) for every section or branch the models cover."""
    found = {}
    for pattern, model in MODELS.items():
        section, _, branch = pattern.partition(".")
        if section not in data:
            continue
        if not branch:
            found[section] = (model, data[section])
        elif branch == "*":
            found.update({f"{section}.{b}": (model, v) for b, v in data[section].items()})
        elif branch in data[section]:
            found[pattern] = (model, data[section][branch])
    return found


def _models_in(annotation) -> list[type[BaseModel]]:
    """Models a field holds directly, in a list, or as the values of a mapping."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict):
        args = typing.get_args(annotation)
        return [m for a in (args[-1:] if origin is dict else args) for m in _models_in(a)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else []


def missing_fields(model: type[BaseModel], value, where: str) -> list[str]:
    """Every ``where.field`` of ``model`` (recursively) that ``value`` does not spell out."""
    if not isinstance(value, dict):
        return []
    missing = [f"{where}.{name}" for name in model.model_fields if name not in value]
    for name, field in model.model_fields.items():
        inner = _models_in(field.annotation)
        if not inner or name not in value:
            continue
        sub = value[name]
        items = (sub.items() if isinstance(sub, dict) and typing.get_origin(
            field.annotation) is dict else enumerate(sub) if isinstance(sub, list)
            else [(None, sub)])
        for key, item in items:
            path = f"{where}.{name}" + (f".{key}" if key is not None else "")
            missing += missing_fields(inner[0], item, path)
    return missing


@pytest.mark.parametrize("name", FILES)
def test_every_field_of_every_model_is_in_the_params_file(repo_root, name):
    data = load(repo_root, name)
    found = entries(data)
    uncovered = [s for s in data if not any(p == s or p.startswith(f"{s}.") for p in found)]
    assert not uncovered, f"{name}: sections no model in MODELS covers: {uncovered}"
    missing = [m for path, (model, value) in found.items()
               for m in missing_fields(model, value, path)]
    assert not missing, f"{name} lacks (add them, with the value the code would use): {missing}"
    for path, (model, value) in found.items():  # and every entry is valid as it stands
        parse_section({path: value}, path, model, name)


def test_both_params_files_have_the_same_sections_and_branches(repo_root):
    shapes = {}
    for name in FILES:
        data = load(repo_root, name)
        shapes[name] = {p for p in entries(data) if p.split(".")[0] not in ONLY_IN}
        for section, only in ONLY_IN.items():
            assert (section in data) == (name == only), f"{section} belongs in {only} only"
    assert shapes["params.yaml"] == shapes["demo/params.yaml"]


def test_the_walk_finds_what_a_file_leaves_out():
    """The check is not vacuous: a target without `informational`, an archive without `sha1`."""
    compare = {"targets": {"t": {"metric": "a.b", "value": 1.0, "tolerance": 0.0}},
               "floors": {}, "gate": {"allow_missing_base": False}}
    missing = missing_fields(CompareParams, compare, "compare")
    assert "compare.targets.t.informational" in missing
    assert "compare.gate.allow_config_change" in missing
    data = {"archives": {"val": {"url": "x.zip", "md5": "0" * 32}}, "expect": ["x"]}
    assert missing_fields(Dataset, data, "data.coco") == ["data.coco.archives.val.sha1"]


def test_every_section_a_params_file_may_have_has_a_model():
    assert {p.split(".")[0] for p in MODELS} <= set(SECTIONS)
    assert set(SECTIONS) - {p.split(".")[0] for p in MODELS} <= {"plots"}  # read by DVC itself
