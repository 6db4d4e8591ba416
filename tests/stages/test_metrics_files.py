"""Reading metrics files as compare and the gate do (stages/metrics_files.py)."""
from stages.metrics_files import flatten, read_metrics_files


def test_read_metrics_files(tmp_path):
    (tmp_path / "good.json").write_text('{"map": 1.5, "per_class": {"cat": 2.0}}')
    (tmp_path / "bad.json").write_text('{"map": 1.5')
    (tmp_path / "list.json").write_text('[1]')
    (tmp_path / "latin.json").write_bytes(b'{"map": "\\xff\xff"}')
    files = [tmp_path / n for n in ("good.json", "bad.json", "list.json", "gone.json",
                                    "latin.json")]
    metrics = read_metrics_files(files)
    assert metrics["good"] == {"map": 1.5, "per_class.cat": 2.0}
    assert "not valid JSON" in metrics["bad"] and "JSON object" in metrics["list"]
    assert "cannot read" in metrics["gone"] and "not valid JSON" in metrics["latin"]


def test_flatten_names_nested_keys_as_dvc_does():
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
