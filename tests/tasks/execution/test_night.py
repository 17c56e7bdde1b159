"""One night of a manifest: jobs per model and target in one batch, the night in its series, errors with lines."""

from datetime import datetime
from pathlib import Path

import pytest
from portq.tasks.core.errors import ConfigError
from portq.tasks.execution.night import submit_night
from portq.tasks.state import records, series
from portq.tasks.state.store import Store

NOW = datetime(2026, 3, 14, 2, 0)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    for name in ("a.pt", "b.pt", "c.pt2"):
        (tmp_path / "models" / name).write_bytes(name.encode())
    path = tmp_path / "vision.yaml"
    path.write_text("""\
groups:
  - name: ts
    models: ["models/*.pt"]
    targets: [cpu, cuda]
    formats: [onnx, onnx.opset17]
    format_options: {onnx: {graph_optimization: basic}}
  - name: ep
    models: ["models/*.pt2", "models/*.safetensors"]
""")
    return path


def test_a_night_is_one_batch_of_its_series(manifest, tmp_path):
    store = Store(str(tmp_path / "store"))
    night = submit_night(manifest, store, max_bytes=1 << 20, now=NOW)
    assert (night.series, night.batch) == ("vision", "vision-2026-03-14")
    assert sorted((s.model, s.target.value) for s in night.specs) == [
        ("a", "cpu"), ("a", "cuda"), ("b", "cpu"), ("b", "cuda"), ("c", "cpu")]
    a = next(s for s in night.specs if s.model == "a")
    assert [r.id for r in a.options.artifacts] == ["onnx", "onnx.opset17"]
    assert a.options.artifacts[0].options == {"graph_optimization": "basic"}
    assert night.warnings == [f"{manifest}, line 8: glob 'models/*.safetensors' of group ep matches no model file "
                              f"(in {manifest.parent})"]
    assert len(records.list_records(store, night.batch)) == 5
    (entry,) = series.nights(store, "vision")
    assert (entry.batch, entry.jobs, entry.rejected, entry.manifest) == (night.batch, 5, 0, str(manifest))
    assert entry.warnings == night.warnings

    # a second night on the same date gets its own batch; the history lists both, oldest first
    again = submit_night(manifest, store, max_bytes=1 << 20, now=NOW)
    assert again.batch == "vision-2026-03-14-2"
    assert [e.batch for e in series.nights(store, "vision")] == ["vision-2026-03-14", "vision-2026-03-14-2"]
    assert series.series_of(store, again.batch) == "vision" and series.series_of(store, "other") is None


def test_files_that_cannot_be_jobs_are_failed_records(manifest, tmp_path):
    store = Store(str(tmp_path / "store"))
    night = submit_night(manifest, store, max_bytes=2, now=NOW)  # every file is over 2 bytes
    assert night.specs == [] and len(night.rejected) == 5
    assert "over the limit of 2" in night.rejected[0].error
    assert series.nights(store, "vision")[0].rejected == 5


@pytest.mark.parametrize("edit, expected", [
    (("formats: [onnx, onnx.opset17]", "formats: [onnx, onnx.opset99]"),
     "line 5, groups[0].formats: artifact onnx.opset99: unknown onnx variant 'opset99'; known: default, external, "),
    (("graph_optimization: basic", "graph_optimization: fastest"),
     "line 6, groups[0].format_options: artifact onnx: option graph_optimization"),
])
def test_registry_problems_name_the_line_and_upload_nothing(manifest, tmp_path, edit, expected):
    manifest.write_text(manifest.read_text().replace(*edit))
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ConfigError) as info:
        submit_night(manifest, store, max_bytes=1 << 20, now=NOW)
    assert expected in info.value.message and info.value.file == str(manifest)
    assert not (tmp_path / "store").exists()


def test_an_explicit_batch_name_is_checked(manifest, tmp_path):
    with pytest.raises(ConfigError, match="is not a valid batch name"):
        submit_night(manifest, Store(str(tmp_path / "store")), max_bytes=1 << 20, batch="a/b")
