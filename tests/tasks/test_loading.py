import zipfile

import pytest
import torch
from portq.tasks.errors import ModelLoadError, UnsafeModelError
from portq.tasks.loading import LoadRequest, detect_kind, load_model


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
