"""Hugging Face model folders as inputs: a tiny BERT text classifier and a tiny ViT image classifier (random weights,
saved with save_pretrained) converted by folder, offline, through the embedded default (run_job in this process);
the folder's archive as the cache key; and the folders portq refuses, each with one line and nothing queued."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import onnx
import pytest
from portq.tasks.core.contract import JobKind, JobStatus, StepStatus
from portq.tasks.core.errors import ModelLoadError
from portq.tasks.core.toolchain import toolchain
from portq.tasks.execution.run import run_job
from portq.tasks.state import records
from portq.tasks.state.model_folders import pack_folder, packed_files, supported_tasks, task_of
from portq.tasks.state.store import Store

from tests.conftest import run_cli
from tests.jobs import prepare

#: a quick latency measurement: these tests check conversion and parity, not speed
QUICK = {"latency": {"runs": 3, "warmup": 1, "windows": 2, "max_windows": 2, "max_seconds": 1, "sweep": False}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two folders, written once by save_pretrained (random weights, nothing downloaded)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))
    bert.save_pretrained(root / "tiny-bert")
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=5))
    vit.save_pretrained(root / "tiny-vit")
    return {"bert": root / "tiny-bert", "vit": root / "tiny-vit"}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to resolve a name or open a connection fails the job (and is recorded here)."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("network access during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # portq sets them itself
        monkeypatch.delenv(var, raising=False)
    return attempts


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


@pytest.mark.parametrize("model, inputs, outputs", [
    ("bert", ["input_ids", "attention_mask", "token_type_ids"], ["logits"]),
    ("vit", ["pixel_values"], ["logits"]),
])
def test_a_folder_converts_offline_with_passing_parity(folders: dict[str, Path], tmp_path: Path,
                                                       no_network: list[str], model: str, inputs: list[str],
                                                       outputs: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([folders[model]], store, batch="hf", options={**QUICK, "sequence_length": 8}).specs
    assert spec.kind is JobKind.huggingface and spec.model == folders[model].name
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    assert art.status is StepStatus.succeeded and art.parity.passed, art.error
    assert len({str(shapes) for shapes in art.parity.sample_shapes}) >= 2  # dynamic dims: parity at other sizes
    assert [o.name for o in art.parity.outputs] == outputs
    graph = onnx.load(report.url(art.path)).graph
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == outputs
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert all(d[0] == "batch" for d in dims)
    if model == "bert":
        assert dims == [["batch", "sequence"]] * 3
    else:
        assert dims == [["batch", 3, 32, 32]]
    assert any("attention implementation: eager" in note for note in report.notes), report.notes
    assert not no_network


@pytest.mark.slow  # a second process imports torch and transformers and converts again: 20-60 s on 2 busy cores
def test_the_reproduce_script_loads_the_folder_without_portq(folders: dict[str, Path], tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([folders["vit"]], store, batch="r", options={**QUICK, "formats": ["torchscript"]}).specs
    report = run_job(spec, store)
    (art,) = report.artifacts
    assert art.parity.passed, report.error or art.error
    script = report.url(art.reproduce)
    text = Path(script).read_text()
    assert "def unpack_folder(" in text and not re.search(r"^\s*(from|import) portq", text, re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTQ_", "HF_", "TRANSFORMERS_"))}
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert res.returncode == 0 and res.stdout.rstrip().endswith("parity passed"), res.stdout + res.stderr
    assert "logits [" in res.stdout  # the outputs carry the model's names there too


def test_the_archive_is_the_cache_key(folders: dict[str, Path], tmp_path: Path, no_network: list[str]) -> None:
    folder = copy_of(folders["vit"], tmp_path, "vit")
    store = Store(str(tmp_path / "store"))
    quick = {**QUICK, "formats": ["torchscript"]}
    (first,) = prepare([folder], store, batch="one", options=quick).specs
    assert run_job(first, store).status is JobStatus.succeeded
    os.utime(folder / "config.json", (1, 1))  # a new time is not a new model
    (again,) = prepare([folder], store, batch="two", options=quick).specs
    assert again.source.model.sha256 == first.source.model.sha256
    report = run_job(again, store)
    assert report.status is JobStatus.succeeded and report.cached
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "label2id": {**config["label2id"], "LABEL_0": 0}},
                                                   indent=1))
    (changed,) = prepare([folder], store, batch="three", options=quick).specs
    assert changed.source.model.sha256 != first.source.model.sha256
    assert changed.job_key(toolchain()) != first.job_key(toolchain())


def test_packing_is_deterministic_and_leaves_out_what_a_load_never_reads(folders: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    folder = copy_of(folders["bert"], tmp_path, "bert")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / "tf_model.h5").write_bytes(b"tf")
    (folder / "pytorch_model.bin").write_bytes(b"older weights")  # safetensors win, as in transformers
    (folder / "tokenizer.json").write_text("{}")
    files = packed_files(folder)
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    digests = set()
    for n in range(2):
        os.utime(folder / "tokenizer.json", (n, n))
        archive = pack_folder(folder, files, tmp_path / f"{n}.tar")
        digests.add(hashlib.sha256(archive.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_tasks_come_from_the_architecture() -> None:
    assert task_of("BertForSequenceClassification") == "text-classification"
    assert task_of("ViTForImageClassification") == "image-classification"
    assert task_of("BertForTokenClassification") == "token-classification"
    assert task_of("BertModel") == "feature-extraction"
    assert supported_tasks("BertForSequenceClassification") == ["text-classification", "feature-extraction"]
    assert supported_tasks("BertModel") == ["feature-extraction"]


def test_feature_extraction_names_the_base_models_outputs(folders: dict[str, Path], tmp_path: Path,
                                                          no_network: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    options = {**QUICK, "task": "feature-extraction", "sequence_length": 8, "formats": ["torchscript"]}
    (spec,) = prepare([folders["bert"]], store, batch="fe", options=options).specs
    report = run_job(spec, store)
    assert report.status is JobStatus.succeeded, report.error
    (art,) = report.artifacts
    assert art.parity.passed and [o.name for o in art.parity.outputs] == ["last_hidden_state", "pooler_output"]


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_mine.MineForSequenceClassification"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, task, cause", [
    (_no_config, None, "the folder has no config.json, so it is not a Hugging Face model folder"),
    (_no_weights, None, "the folder has config.json but no weights (model.safetensors,"),
    (_remote_code, None, "config.json maps the model to code shipped with it (auto_map), which loading would run "
                         "(resubmit with --trust-remote-code if you trust where the folder came from)"),
    (None, "image-classification", "BertForSequenceClassification does not support --task image-classification; it "
                                   "supports: text-classification, feature-extraction"),
    (None, "translation", "--task 'translation' is not a task portq converts; known: feature-extraction,"),
])
def test_a_bad_folder_is_one_line_and_nothing_is_queued(folders: dict[str, Path], tmp_path: Path, damage, task,
                                                        cause) -> None:
    folder = copy_of(folders["bert"], tmp_path, "bert")
    if damage is not None:
        damage(folder)
    store = Store(str(tmp_path / "store"))
    sub = prepare([folder], store, batch="bad", options={"task": task} if task else {})
    assert not sub.specs
    (record,) = records.list_records(store, "bad")
    assert record.status is JobStatus.failed and "\n" not in record.error
    assert record.error.startswith(f"[step submit, file {folder}] {cause}"), record.error
    assert not store.list("inputs")  # nothing uploaded


def test_the_cli_refuses_a_bad_folder_in_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(folders["bert"], tmp_path, "bert")
    _no_weights(folder)
    res = run_cli("submit", str(folder), "--task", "text-classification",
                  env={"PORTQ_STORE": str(tmp_path / "store")})
    assert res.returncode == 2, res.stderr  # a path mistake: refused before anything is queued
    (line,) = [x for x in res.stderr.splitlines() if x.strip()]
    assert line.startswith(f"[error] [step submit, file {folder}] the folder has config.json but no weights")
    assert not (tmp_path / "store" / "batches").exists()


def test_code_shipped_with_the_folder_is_refused_on_the_worker_too(folders: dict[str, Path], tmp_path: Path) -> None:
    """A spec that says trust_remote_code is false is refused at load even if the client was bypassed."""
    from portq.tasks.sources.huggingface import load_folder

    folder = copy_of(folders["bert"], tmp_path, "bert")
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([folder], store, batch="w", options={}).specs
    _remote_code(folder)
    with pytest.raises(ModelLoadError, match=r"\[step load, file .*\] config.json maps the model to code"):
        load_folder(folder, spec.source, str(folder))


def test_without_transformers_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from portq.tasks.sources.huggingface import _require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelLoadError) as e:
        _require_transformers("my-bert")
    assert "transformers is not installed" in e.value.message and "pip install 'portq[hf]'" in e.value.message


def test_a_folder_loads_with_the_offline_variables_set_and_the_environment_is_left_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from portq.tasks.sources import hf_recipe

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with hf_recipe.offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


@pytest.mark.parametrize("name, kind", [("../escaped", tarfile.REGTYPE), ("/etc/escaped", tarfile.REGTYPE),
                                        ("link", tarfile.SYMTYPE)])
def test_an_archive_member_outside_the_folder_is_refused(tmp_path: Path, name: str, kind: bytes) -> None:
    """The worker unpacks what the store holds: a member that is not a plain file inside the folder stops it."""
    from portq.tasks.sources.hf_recipe import UnsafeArchive, unpack_folder

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w:") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match=f"archive member '{name}' is not a plain file inside the folder"):
        unpack_folder(archive, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir()) and not (tmp_path / "escaped").exists()


#: one tiny model per registered task: its class and the outputs its wrapper names
TASK_MODELS = {
    "feature-extraction": ("BertModel", ["last_hidden_state", "pooler_output"]),
    "text-classification": ("BertForSequenceClassification", ["logits"]),
    "token-classification": ("BertForTokenClassification", ["logits"]),
    "fill-mask": ("BertForMaskedLM", ["logits"]),
    "question-answering": ("BertForQuestionAnswering", ["start_logits", "end_logits"]),
    "image-classification": ("ViTForImageClassification", ["logits"]),
}


def test_every_registered_task_has_a_small_model_case() -> None:
    from portq.tasks.state.model_folders import HF_TASKS

    assert sorted(TASK_MODELS) == sorted(HF_TASKS.names())


@pytest.mark.parametrize("task", sorted(TASK_MODELS))
def test_each_task_builds_its_model_with_named_outputs(task: str, folders: dict[str, Path], tmp_path: Path,
                                                       no_network: list[str]) -> None:
    import numpy as np
    import torch
    import transformers
    from portq.tasks.sources.builders import build_source
    from portq.tasks.sources.inputs import InputSignature, random_sample

    cls_name, outputs = TASK_MODELS[task]
    if cls_name.startswith("ViT"):
        folder = folders["vit"]
    else:
        cls = getattr(transformers, cls_name)
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64)
        folder = tmp_path / "model"
        cls(config).save_pretrained(folder)
    store = Store(str(tmp_path / "store"))
    (spec,) = prepare([folder], store, batch="t", options={"sequence_length": 4}).specs
    assert spec.source.task == task  # read from config.json's architectures
    model = build_source(spec, store)
    assert model.module.portq_output_names == outputs
    sample = random_sample(InputSignature(model.input_specs), np.random.default_rng(0))
    with torch.no_grad():
        got = model.module(*(torch.from_numpy(a) for a in sample))
    assert len(got) == len(outputs) and all(isinstance(t, torch.Tensor) for t in got)
