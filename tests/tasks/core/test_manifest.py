"""Manifests: validation with file, line and key; globs; model names; options laid over the defaults."""

from datetime import datetime
from pathlib import Path

import pytest
from portq.tasks.core.contract import Precision, Target
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.manifest import load_manifest, render_batch_name


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for rel in ("vision/resnet.pt2", "vision/vit.pt2", "text/bert.pt", "text/bert.npz", "other/resnet.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def write(directory: Path, text: str, name: str = "nightly.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problem(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert info.value.step == "manifest" and info.value.file == str(path)
    return info.value.message


def test_groups_take_the_defaults_and_expand_their_globs(models):
    plan = load_manifest(write(models, """\
batch: "nightly-{date}"
defaults:
  targets: [cpu, cuda]
  latency: {runs: 10, warmup: 1}
  tolerance: {atol: 1.0e-3}
groups:
  - name: vision
    models: ["vision/*.pt2"]
    formats: [onnx, onnx.opset17]
    latency: {warmup: 3}
    tolerance: {precision: fp16}
    optimize: [auto]
    precision: [int8]
  - models: ["text/**/*.pt"]
    targets: [cpu]
    inputs: ["ids:int64[batch=2,16]{0,1000}"]
    dynamic: [batch]
    arch: pkg.models:Bert
    arch_kwargs: {layers: 2}
"""))
    assert plan.series == "nightly" and plan.warnings == []
    assert plan.batch_name(datetime(2026, 3, 14, 2, 0, 5)) == "nightly-2026-03-14"
    vision, text = plan.groups
    assert [p.name for p in vision.paths] == ["resnet.pt2", "vit.pt2"]  # sorted; the .npz sample is no model
    assert vision.targets == [Target.cpu, Target.cuda] and vision.formats == ["onnx", "onnx.opset17"]
    assert vision.options["latency"] == {"runs": 10, "warmup": 3}  # merged key by key
    assert vision.options["tolerance"] == {"atol": 1e-3, "precision": Precision.fp16}
    assert vision.options["optimize"] == {"candidates": ["auto"], "precisions": [Precision.int8]}
    assert "optimize" not in text.options
    assert [p.name for p in text.paths] == ["bert.pt"] and text.targets == [Target.cpu]
    assert text.formats == ["onnx"] and text.options["dynamic"] == ["batch"]
    assert text.options["inputs"][0]["dynamic"] == {0: "batch"}
    assert text.load == {"arch": "pkg.models:Bert", "arch_kwargs": {"layers": 2}}


def test_batch_name_placeholders():
    now = datetime(2026, 3, 14, 2, 3, 4)
    assert render_batch_name("{series}-{date}-{time}", "vision", now) == "vision-2026-03-14-020304"


@pytest.mark.parametrize("text, expected", [
    # unknown keys, at the top, in a group and in a nested option
    ("groups:\n  - models: ['*.pt']\n    formatz: [onnx]\n",
     "line 3, groups[0].formatz: unknown key 'formatz' (known keys here: targets, formats"),
    ("serie: x\ngroups:\n  - models: ['*.pt']\n", "line 1, serie: unknown key 'serie'"),
    ("groups:\n  - models: ['*.pt']\n    latency:\n      runz: 3\n",
     "line 4, groups[0].latency.runz: unknown key 'runz' (known keys here: warmup, runs"),
    ("groups:\n  - models: ['*.pt']\n    tolerance:\n      outputs:\n        logits: {atoll: 1}\n",
     "line 5, groups[0].tolerance.outputs.logits.atoll: unknown key 'atoll' (known keys here: mode, atol"),
    ("groups:\n  - models: ['*.pt']\n    precision: [fp8]\n",
     "line 3, groups[0].precision[0]: Input should be 'fp32', 'fp16', 'bf16' or 'int8'"),
    # values
    ("defaults:\n  targets: [cpu, tpu]\ngroups:\n  - models: ['*.pt']\n",
     "line 2, defaults.targets[1]: Input should be 'cpu' or 'cuda'"),
    ("groups:\n  - models: ['*.pt']\n    formats: [onnx, onxx]\n",
     "line 3, groups[0].formats: 'onxx' is not an artifact"),
    ("groups:\n  - models: ['*.pt']\n    inputs: ['ids:int64[2,16]']\n",
     "line 3, groups[0].inputs: input spec 'ids:int64[2,16]': integer inputs need a value range"),
    ("groups:\n  - models: ['*.pt']\n    tolerance: {atol: -1}\n",
     "line 3, groups[0].tolerance.atol: Input should be greater than or equal to 0"),
    ("batch: 'nightly-{day}'\ngroups:\n  - models: ['*.pt']\n", "line 1, batch: unknown placeholder {day}"),
    ("batch: 'nightly/{date}'\ngroups:\n  - models: ['*.pt']\n", "line 1, batch: 'nightly/{date}' does not make"),
    ("series: 'a b'\ngroups:\n  - models: ['*.pt']\n", "line 1, series: 'a b' is not a valid series name"),
    # structure
    ("groups:\n  - name: empty\n", "line 2, groups[0].models: 'models' is required here"),
    ("groups: []\n", "line 1, groups: List should have at least 1 item"),
    ("defaults: {}\n", "line 1, groups: 'groups' is required here"),
    ("groups:\n  - models: ['*.pt']\n  - models: ['*.pt2']\n    models: ['*.pt']\n",
     "line 4, groups[1].models: given twice (first on line 3)"),
    ("groups:\n  - models: ['*.pt'\n", "line 3: not valid YAML"),
    ("", "the manifest is empty"),
    ("- a\n- b\n", "the manifest must be a mapping"),
])
def test_problems_name_the_line_and_the_key(tmp_path, text, expected):
    assert expected in problem(write(tmp_path, text))


def test_several_problems_are_listed_together(tmp_path):
    message = problem(write(tmp_path, "groups:\n  - models: ['*.pt']\n    formatz: [x]\n    dynamik: [batch]\n"))
    assert "2 problems:" in message and "line 3, groups[0].formatz" in message
    assert "line 4, groups[0].dynamik" in message


def test_anchors_and_merge_keys_are_read(models):
    plan = load_manifest(write(models, """\
groups:
  - &vision
    models: [vision/vit.pt2]
    targets: [cuda]
    latency: {runs: 5}
  - <<: *vision
    models: [text/bert.pt]
"""))
    text = plan.groups[1]
    assert [p.name for p in text.paths] == ["bert.pt"]  # its own key wins over the merged one
    assert text.targets == [Target.cuda] and text.options["latency"] == {"runs": 5}


def test_a_glob_matching_nothing_is_a_warning_naming_it(models):
    plan = load_manifest(write(models, "groups:\n  - name: vision\n    models: ['vision/*.pt2', 'audio/*.pt']\n"))
    (warning,) = plan.warnings
    assert "line 3: glob 'audio/*.pt' of group vision matches no model file" in warning
    assert [p.name for p in plan.groups[0].paths] == ["resnet.pt2", "vit.pt2"]


def test_no_glob_matching_anything_is_an_error(models):
    message = problem(write(models, "groups:\n  - models: ['audio/*.pt']\n"))
    assert "no glob matched a model file" in message and "glob 'audio/*.pt'" in message


def test_duplicate_model_names_across_groups_name_both_groups(models):
    message = problem(write(models, "groups:\n  - name: vision\n    models: ['vision/*']\n"
                                    "  - name: legacy\n    models: ['other/*.pt']\n"))
    assert "model name 'resnet' comes twice, from groups vision (line 2) and legacy (line 4)" in message
    assert str(models / "vision" / "resnet.pt2") in message and str(models / "other" / "resnet.pt") in message


def test_one_file_in_two_groups_is_refused(models):
    message = problem(write(models, "groups:\n  - models: ['text/*.pt']\n  - models: ['text/bert.pt']\n"))
    assert "(model 'bert') is in two groups groups[0] (line 2) and groups[1] (line 3)" in message
    assert "`targets` gives it one job per target" in message


def test_duplicate_names_within_one_group(models):
    message = problem(write(models, "groups:\n  - models: ['**/resnet.*']\n"))
    assert "model name 'resnet' comes twice, from group groups[0] (line 2)" in message


def test_series_defaults_to_the_manifest_name(models):
    plan = load_manifest(write(models, "groups:\n  - models: ['text/*.pt']\n", name="vision-nightly.yml"))
    assert plan.series == "vision-nightly" and plan.batch_name(datetime(2026, 1, 2)) == "vision-nightly-2026-01-02"


def test_a_missing_manifest(tmp_path):
    assert "cannot read the manifest" in problem(tmp_path / "nope.yaml")


def test_a_hugging_face_folder_is_a_model_and_takes_its_options(models):
    (models / "hf" / "tiny-bert").mkdir(parents=True)
    (models / "hf" / "tiny-bert" / "config.json").write_text("{}")
    (models / "hf" / "notes").mkdir()  # a folder without config.json is no model
    plan = load_manifest(write(models, """\
groups:
  - models: ["hf/*"]
    task: feature-extraction
    sequence_length: 32
"""))
    (group,) = plan.groups
    assert group.paths == [models / "hf" / "tiny-bert"]
    assert group.load == {"task": "feature-extraction", "sequence_length": 32}
