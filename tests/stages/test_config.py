from typing import Literal

import pytest
from pydantic import Field

from stages.config import ParamsError, Section, load_section, parse_section


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
