import os
from typing import Literal

import pytest
from pydantic import Field

from stages.config import ParamsError, Section, load_section, load_yaml, parse_section


class Inner(Section):
    md5: str = Field(pattern=r"^[0-9a-f]{32}$")


class Demo(Section):
    head: Literal["seed", "gluoncv"] = "seed"
    images: int = Field(gt=0)
    items: list[Inner] = []


def test_valid_section_parses():
    p = parse_section({"demo": {"images": 3, "items": [{"md5": "0" * 32}]}}, "demo", Demo)
    assert p.images == 3 and p.head == "seed"


@pytest.mark.parametrize("section, needle", [
    ({"images": 0}, "demo.images: Input should be greater than 0 (got 0)"),
    ({"images": "3"}, "demo.images: Input should be a valid integer"),
    ({"images": 1, "head": "yolo"}, "demo.head: Input should be 'seed' or 'gluoncv' (got 'yolo')"),
    ({"images": 1, "imagse": 2}, "demo.imagse: unknown key; allowed keys: head, images, items"),
    ({"images": 1, "items": [{"md5": "x", "sha": 1}]}, "demo.items.0.sha: unknown key; allowed keys: md5"),
    ({}, "demo.images: required key is missing"),
])
def test_bad_values_name_key_value_and_allowed(section, needle):
    with pytest.raises(ParamsError) as err:
        parse_section({"demo": section}, "demo", Demo)
    assert needle in str(err.value)


def test_unknown_section_and_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text("demo: {images: 1}\nevalute: {}\n")
    with pytest.raises(ParamsError, match="unknown section.*'evalute'"):
        load_section("demo", Demo, tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="cannot read params file"):
        load_section("demo", Demo, tmp_path / "nope.yaml")


def test_duplicate_yaml_keys_are_an_error_naming_the_key(tmp_path):
    """PyYAML keeps the last of two equal keys without a word; params.yaml must not."""
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(ParamsError, match=r"(?s)params.yaml: not valid YAML: .*found duplicate "
                                          r"key 'lr' \(first at line 2\).*line 4"):
        load_section("train", Demo, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: {lr: 1}\ntrain: {lr: 2}\n")
    with pytest.raises(ParamsError, match="duplicate key 'train'"):
        load_section("train", Demo, tmp_path / "params.yaml")
    # a `<<` merge may be overridden: that is what merges are for
    data = load_yaml("base: &b {images: 1, head: gluoncv}\ndemo: {<<: *b, images: 3}\n")
    assert data["demo"] == {"images": 3, "head": "gluoncv"}


class Numbers(Section):
    ratio: float = Field(gt=0)
    scale: list[float] = []


@pytest.mark.parametrize("text, key", [
    ("ratio: .inf", "demo.ratio"), ("ratio: .nan", "demo.ratio"), ("ratio: -.inf", "demo.ratio"),
    ("{ratio: 1.0, scale: [1.0, .nan]}", "demo.scale.1"),
])
def test_non_finite_floats_are_refused(text, key):
    data = load_yaml(f"demo: {text}\n" if text.startswith("{") else f"demo:\n  {text}\n")
    with pytest.raises(ParamsError, match=f"{key}: Input should be a finite number"):
        parse_section(data, "demo", Numbers)


def test_unknown_network_is_a_params_error_exit_2(tmp_path):
    """The README promises exit 2 for an unknown name; it used to surface as exit 1 from
    build_network, after the stage had started its work."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "demo" / "params.yaml").read_text())
    params["train"]["voc"]["network"] = "ssd_512_resnet"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run([sys.executable, "-m", "stages.train", "voc", "--data", "d", "--out",
                          "o", "--checkpoints", "c", "--live", "l", "--metrics", "m.json",
                          "--speed", "s.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "train.voc.network: Value error, unknown network 'ssd_512_resnet'; known: demo_ssd, " \
           "ssd_300_vgg16_atrous_coco, ssd_300_vgg16_atrous_voc" in run.stderr
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_every_network_field_is_checked_against_the_registry():
    """convert.<branch>.network too (the same Section validator), before any model is built."""
    from stages.convert import ConvertParams

    with pytest.raises(ParamsError, match="convert.coco.network: Value error, unknown network "
                                          "'vgg'; known: demo_ssd"):
        parse_section({"convert.coco": {"network": "vgg", "data_shape": 300}}, "convert.coco",
                      ConvertParams)
    assert parse_section({"convert.coco": {"weights": "trained"}}, "convert.coco",
                         ConvertParams).network is None  # unset: nothing to check
