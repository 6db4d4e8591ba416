"""The choices registry (stages/choices.py) that `when` conditions are checked against agrees
with what the stages themselves accept, and covers every choice in the params files."""
import typing

import pytest
import yaml

from stages.choices import CHOICES, allowed_values
from stages.models import NETWORKS


def stage_models():
    """Each params section pattern -> the stage's params model (tests may import stages)."""
    from stages.convert import ConvertParams
    from stages.quantize import QuantizeParams
    from stages.train import TrainParams

    return {"convert": ConvertParams, "quantize": QuantizeParams, "train": TrainParams}


@pytest.mark.parametrize("pattern", CHOICES)
def test_registry_matches_the_stage_models(pattern):
    section, _, field = pattern.split(".")
    annotation = stage_models()[section].model_fields[field].annotation
    assert set(typing.get_args(annotation)) == set(typing.get_args(CHOICES[pattern]))


def test_every_literal_field_of_the_stage_models_is_registered():
    for section, model in stage_models().items():
        for name, info in model.model_fields.items():
            if typing.get_origin(info.annotation) is typing.Literal:
                assert allowed_values(f"{section}.any.{name}") is not None, (section, name)


def test_network_keys_name_the_network_registry():
    assert allowed_values("train.voc.network") == tuple(sorted(NETWORKS))
    assert allowed_values("convert.coco.network") == tuple(sorted(NETWORKS))
    assert allowed_values("convert.coco.weights") == ("file", "trained")
    assert allowed_values("weights.vgg16_atrous.source") is None  # free: zoo or a path
    assert allowed_values("convert.head") is None  # the pattern has a branch level


@pytest.mark.parametrize("params_file", ["params.yaml", "demo/params.yaml"])
def test_params_files_hold_allowed_values(repo_root, params_file):
    data = yaml.safe_load((repo_root / params_file).read_text())
    checked = 0
    for section in ("convert", "quantize", "train"):
        for branch, values in data.get(section, {}).items():
            for field, value in values.items():
                allowed = allowed_values(f"{section}.{branch}.{field}")
                if allowed is not None and value is not None:  # null: from net.json
                    assert value in allowed, (section, branch, field, value)
                    checked += 1
    assert checked >= 5
