import zipfile

import pytest
import torch
from portq.tasks.core.errors import ModelLoadError, UnsafeModelError
from portq.tasks.sources.loading import LoadRequest, detect_kind, load_model


class Tiny(torch.nn.Module):
    def __init__(self, n: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(n, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture
def files(tmp_path):
    m = Tiny().eval()
    x = torch.randn(1, 4)
    torch.jit.save(torch.jit.trace(m, x), tmp_path / "ts.bin")
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "ep.bin")
    torch.save(m.state_dict(), tmp_path / "sd.bin")
    torch.save({"epoch": 3, "model_state_dict": m.state_dict()}, tmp_path / "ckpt.bin")
    torch.save(m, tmp_path / "whole.bin")
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    return tmp_path


@pytest.mark.parametrize("name, kind", [
    ("ts.bin", "torchscript"), ("ep.bin", "exported_program"), ("sd.bin", "torch_save"),
    ("whole.bin", "torch_save"), ("w.safetensors", "safetensors"),
])
def test_kind_is_detected_from_content_not_name(files, name, kind):
    assert detect_kind(files / name, name) == kind


def test_bad_files_get_a_reason_naming_the_file(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {
        tmp_path / "missing.pt": "does not exist",
        tmp_path: "is a directory",
        tmp_path / "notes.pt": "not a PyTorch model file",
        tmp_path / "empty.pt": "file is empty",
    }
    for path, reason in cases.items():
        with pytest.raises(ModelLoadError, match=reason) as exc:
            detect_kind(path, str(path))
        assert str(path) in exc.value.message and exc.value.step == "load"


def test_truncated_archive(files):
    data = (files / "ts.bin").read_bytes()
    (files / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(LoadRequest(path=files / "cut.pt", display="cut.pt"))


def test_loads_torchscript_and_program_with_input_names(files):
    ts = load_model(LoadRequest(path=files / "ts.bin", display="ts"))
    assert ts.kind == "torchscript" and ts.input_names == ["x"]
    ep = load_model(LoadRequest(path=files / "ep.bin", display="ep"))
    assert ep.kind == "exported_program" and ep.input_names == ["x"] and ep.example_inputs[0].shape == (1, 4)


def test_state_dict_and_checkpoint_need_arch(files):
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(LoadRequest(path=files / "sd.bin", display="sd.bin"))
    for name in ("sd.bin", "ckpt.bin", "w.safetensors"):
        m = load_model(LoadRequest(path=files / name, display=name, arch=f"{__name__}:Tiny", arch_kwargs={"n": 4}))
        assert isinstance(m.module, Tiny)
    with pytest.raises(ModelLoadError, match="weights do not fit"):
        load_model(LoadRequest(path=files / "sd.bin", display="sd.bin", arch=f"{__name__}:Tiny", arch_kwargs={"n": 5}))


def test_whole_pickled_module_is_refused_without_trust(files):
    with pytest.raises(UnsafeModelError, match="refused unread") as exc:
        load_model(LoadRequest(path=files / "whole.bin", display="whole.bin"))
    assert "--trust-pickle" in exc.value.message
    m = load_model(LoadRequest(path=files / "whole.bin", display="whole.bin", trust_pickle=True))
    assert m.kind == "pickled_module"


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weights": torch.zeros(1), "payload": Boom()}, tmp_path / "evil.pt")
    assert zipfile.is_zipfile(tmp_path / "evil.pt")
    with pytest.raises(UnsafeModelError):
        load_model(LoadRequest(path=tmp_path / "evil.pt", display="evil.pt"))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# --------------------------------------------------------------------- every input kind through the real CLI

class TinyArgs(torch.nn.Module):
    """A model whose constructor takes arguments, named to the CLI by --arch and --arch-kwargs."""

    def __init__(self, n: int = 4, out: int = 2):
        super().__init__()
        self.lin = torch.nn.Linear(n, out)

    def forward(self, x):
        return self.lin(x).relu()


@pytest.fixture
def weight_files(tmp_path):
    torch.manual_seed(0)
    m = TinyArgs(6, 3).eval()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}, "model_state_dict": m.state_dict()}, tmp_path / "ckpt.pt")
    # a DataParallel/DDP checkpoint: every key prefixed with "module."
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(m, tmp_path / "whole.pt")
    return tmp_path


def _cli_submit(paths, store, *extra):
    import json

    from tests.conftest import run_cli

    env = {"PORTQ_STORE": str(store)}
    res = run_cli("submit", *map(str, paths), "--batch", "kinds", "--input", "x:float32[batch=2,6]", "--runs", "1",
                  "-f", "onnx", "-f", "torchscript", *extra, env=env)
    doc = json.loads(run_cli("report", "kinds", "--json", env=env).stdout)
    return res, {j["model"]: j for j in doc["jobs"]}


def test_state_dicts_checkpoints_and_safetensors_convert_through_the_cli(weight_files, tmp_path):
    files = [weight_files / n for n in ("sd.pt", "ckpt.pt", "ddp.pt", "w.safetensors")]
    res, jobs = _cli_submit(files, tmp_path / "store", "--arch", f"{__name__}:TinyArgs", "--arch-kwargs",
                            '{"n": 6, "out": 3}', "--dynamic", "batch")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("sd", "ckpt", "ddp", "w"):
        job = jobs[name]
        assert job["status"] == "succeeded", job["error"]
        assert [(a["format"], a["parity"]["passed"]) for a in job["artifacts"]] == [("onnx", True),
                                                                                   ("torchscript", True)]
        assert job["artifacts"][0]["route"] == "dynamo" and job["artifacts"][1]["route"] == "trace"


def test_weights_without_arch_or_with_wrong_kwargs_say_what_to_do(weight_files, tmp_path):
    res, jobs = _cli_submit([weight_files / "sd.pt"], tmp_path / "a")
    assert res.returncode == 1
    assert "state dict (2 tensors) with no model code" in jobs["sd"]["error"]
    assert "--arch package.module:Class" in jobs["sd"]["error"]
    res, jobs = _cli_submit([weight_files / "ckpt.pt"], tmp_path / "b", "--arch", f"{__name__}:TinyArgs",
                            "--arch-kwargs", '{"n": 5, "out": 3}')
    assert res.returncode == 1 and "weights do not fit --arch" in jobs["ckpt"]["error"]
    res, jobs = _cli_submit([weight_files / "sd.pt"], tmp_path / "c", "--arch", "no_such_pkg.models:Net")
    assert res.returncode == 1 and "cannot import 'no_such_pkg.models'" in jobs["sd"]["error"]


def test_whole_pickled_module_needs_trust_pickle_through_the_cli(weight_files, tmp_path):
    res, jobs = _cli_submit([weight_files / "whole.pt"], tmp_path / "a")
    assert res.returncode == 1
    error = jobs["whole"]["error"]
    assert "refused unread" in error and "would run code from the file" in error and "--trust-pickle" in error
    res, jobs = _cli_submit([weight_files / "whole.pt"], tmp_path / "b", "--trust-pickle")
    assert res.returncode == 0, res.stderr
    assert jobs["whole"]["status"] == "succeeded"


def test_program_with_library_output_classes_loads(tmp_path):
    """A .pt2 whose outputs are transformers ModelOutputs: portq imports transformers to rebuild them."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from transformers import BertConfig, BertModel\n"
        "m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,"
        " intermediate_size=32)).eval()\n"
        f"torch.export.save(torch.export.export(m, (torch.randint(0, 50, (1, 4)),)), {str(tmp_path / 'bert.pt2')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    # a fresh interpreter that has not imported transformers
    check = ("import sys; from pathlib import Path; from portq.tasks.sources.loading import LoadRequest, load_model\n"
             f"m = load_model(LoadRequest(path=Path({str(tmp_path / 'bert.pt2')!r}), display='bert.pt2'))\n"
             "print(m.kind, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["exported_program", "True"]
