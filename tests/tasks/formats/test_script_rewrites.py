"""The TorchScript rewrites behind the ONNX routes (script_unfuse, script_complex, symbolics, script_prepare) and
the program routes' fixes, each on a small model built in code, with parity in onnxruntime at two sizes.

The models are the zoo's (tests/zoo/harder.py); the zoo converts them end to end through run_job.
"""

from __future__ import annotations

import ast
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from portq.tasks.formats import FORMATS, recipes
from portq.tasks.formats.diagnose import blocker
from portq.tasks.formats.onnx import export as onnx_export
from portq.tasks.formats.reproduce import copied_modules, module_source
from portq.tasks.formats.rewrites import script_unfuse
from portq.tasks.formats.rewrites.script_prepare import RewriteMismatch, check_same, prepare_script
from portq.tasks.sources.builders import SOURCE_BUILDERS
from torch import nn

from tests.zoo import harder

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def _trace(module: nn.Module, args: tuple[Any, ...]) -> Any:
    with torch.no_grad():  # how users trace: the fused fast paths are recorded
        return torch.jit.trace(module.eval(), args, strict=False, check_trace=False)


def _source(script: Any = None, module: Any = None, program: Any = None) -> Any:
    return types.SimpleNamespace(module=module if module is not None else script, script=script, program=program)


def _opts(names: list[str], dynamic: dict[int, dict[int, str]], outputs: int = 1) -> dict[str, Any]:
    return {"input_names": names, "output_names": [f"output.{i}" for i in range(outputs)], "dynamic": dynamic,
            "opset": 18}


def _flat(obj: Any) -> list[np.ndarray]:
    if isinstance(obj, torch.Tensor):
        return [obj.detach().numpy()]
    return [a for o in (obj.values() if isinstance(obj, dict) else obj) for a in _flat(o)]


def assert_parity(reference: Callable[..., Any], path: Path, arg_sets: list[tuple[Any, ...]],
                  names: list[str]) -> None:
    """onnxruntime against eager on every input set, at portq's fp32 tolerance (1e-4 abs or 1e-3 rel)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fed = {i.name for i in session.get_inputs()}
    for args in arg_sets:
        with torch.no_grad():
            expected = _flat(reference(*args))
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args) if n in fed})
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------- fused transformer fast paths

def _masked_encoder() -> tuple[nn.Module, tuple[Any, ...], tuple[Any, ...]]:
    torch.manual_seed(0)
    return (harder.MaskedEncoder(), (torch.randn(3, 7, 32), harder.padding_mask([7, 4, 2], 7)),
            (torch.randn(3, 11, 32), harder.padding_mask([5, 11, 1], 11)))


def test_the_nested_tensor_path_is_rewritten_into_dense_ops_that_match_the_archive() -> None:
    module, args, longer = _masked_encoder()
    archive = _trace(module, args)
    assert {"aten::_nested_tensor_from_mask", "aten::_transformer_encoder_layer_fwd",
            "aten::to_padded_tensor"} <= set(script_unfuse.fused_ops(archive))
    rewritten, notes = prepare_script(archive, args, [args, longer])
    assert not script_unfuse.fused_ops(rewritten)
    assert notes == ["rewrote 1 x aten::_nested_tensor_from_mask into plain ops",
                     "rewrote 2 x aten::_transformer_encoder_layer_fwd into plain ops",
                     "rewrote 1 x aten::to_padded_tensor into plain ops"]
    # the kernel keeps the first keep.sum(1) rows whatever the mask looks like; so does the rewrite
    left = harder.padding_mask([7, 4, 2], 7).flip(1)
    check_same(archive, rewritten, [(torch.randn(3, 7, 32), left)])


def test_a_rewrite_that_changes_the_result_is_refused() -> None:
    module, args, _ = _masked_encoder()
    archive = _trace(module, args)
    other = _trace(harder.MaskedEncoder(), args)  # other weights: another function
    with pytest.raises(RewriteMismatch, match="changed output 0"):
        check_same(archive, other, [args])


@pytest.mark.parametrize("build", ["encoder", "seq2seq"])
def test_masked_transformers_convert_by_the_torchscript_route(build: str, tmp_path: Path) -> None:
    if build == "encoder":
        module, args, longer = _masked_encoder()
        names, dynamic = ["x", "pad"], {0: {1: "seq"}, 1: {1: "seq"}}
    else:
        torch.manual_seed(3)
        module = harder.MaskedSeq2Seq()
        args = (torch.randn(3, 7, 32), torch.randn(3, 5, 32), harder.padding_mask([7, 3, 5], 7))
        longer = (torch.randn(3, 10, 32), torch.randn(3, 8, 32), harder.padding_mask([2, 10, 6], 10))
        names, dynamic = ["src", "tgt", "pad"], {0: {1: "src_len"}, 1: {1: "tgt_len"}, 2: {1: "src_len"}}
    archive = _trace(module, args)
    notes = onnx_export.onnx_torchscript(_source(archive), args, str(tmp_path / "m.onnx"), _opts(names, dynamic))
    assert any("_transformer_encoder_layer_fwd" in n for n in notes)
    assert_parity(archive, tmp_path / "m.onnx", [args, longer], names)


# ----------------------------------------------------------- complex values and the operators the exporter lacks

@pytest.mark.parametrize("name", ["llama_polar_rope", "whisper_frontend"])
def test_archives_convert_by_more_than_one_route(name: str, tmp_path: Path) -> None:
    """Llama-style rotary embeddings (torch.polar) and a Whisper-style front end (unfold, rfft, diff): the
    TorchScript-based exporter and TorchScript -> ExportedProgram -> dynamo both convert them, at two lengths."""
    torch.manual_seed(10)
    if name == "llama_polar_rope":
        module: nn.Module = harder.PolarLlama()
        args, longer = (torch.randint(0, 100, (2, 7)),), (torch.randint(0, 100, (2, 12)),)
        dynamic = {0: {1: "seq"}}
    else:
        module = harder.WhisperFrontEnd()
        args, longer = (torch.randn(2, 32 * 15 + 64),), (torch.randn(2, 32 * 23 + 64),)
        dynamic = {0: {1: "samples"}}
    archive = _trace(module, args)
    for route in (onnx_export.onnx_torchscript, onnx_export.onnx_ts2ep):
        path = tmp_path / f"{route.__name__}.onnx"
        notes = route(_source(archive), args, str(path), _opts(["x"], dynamic))
        assert any("lowered" in n and "complex" in n for n in notes or [])
        assert_parity(archive, path, [args, longer], ["x"])


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


SYMBOLIC_CASES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "diff_n2_prepend_append": lambda x: torch.diff(x, n=2, dim=1, prepend=x[:, :2] * 2, append=x[:, -1:]),
    "rfft_ortho_abs": lambda x: torch.fft.rfft(x, dim=1, norm="ortho").abs(),
    "rfft_forward_n": lambda x: torch.view_as_real(torch.fft.rfft(x, n=6, dim=-1, norm="forward")),
    "fft_ifft_roundtrip": lambda x: torch.fft.ifft(torch.fft.fft(x, dim=1) * 2.0, dim=1).real,
    "polar_angle": lambda x: (torch.fft.fft(x, dim=-1) * torch.polar(torch.ones_like(x), x)).angle(),
    "irfft_odd_n": lambda x: torch.fft.irfft(torch.fft.rfft(x, dim=-1), n=x.shape[-1], dim=-1),
    "unfold_mid": lambda x: x.unfold(1, 3, 2).sum(-1),
    "cumsum_of_bools": lambda x: (x > 0).cumsum(1).float() * x,
}


@pytest.mark.parametrize("name", list(SYMBOLIC_CASES))
def test_symbolics_match_eager_at_two_lengths(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    args, longer = (torch.randn(2, 9, 5),), (torch.randn(2, 12, 5),)
    archive = _trace(_Fn(SYMBOLIC_CASES[name]), args)
    onnx_export.onnx_torchscript(_source(archive), args, str(tmp_path / "f.onnx"), _opts(["x"], {0: {1: "seq"}}))
    assert_parity(archive, tmp_path / "f.onnx", [args, longer], ["x"])


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        h = self.lin(x)
        return h, {"probs": h.softmax(-1), "total": h.sum(-1)}, [h.max(-1)[0]]


def test_dict_outputs_are_returned_flat_in_portqs_order_and_weights_are_initializers(tmp_path: Path) -> None:
    import onnx

    args = (torch.randn(2, 4),)
    archive = _trace(DictOut(), args)
    onnx_export.onnx_torchscript(_source(archive), args, str(tmp_path / "d.onnx"), _opts(["x"], {}, outputs=4))
    assert_parity(archive, tmp_path / "d.onnx", [args], ["x"])
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    assert {tuple(i.dims) for i in graph.initializer} >= {(3, 4), (3,)}  # where ONNX tools look for weights
    assert not [n for n in graph.node if n.op_type == "Constant"]


# ----------------------------------------------------------------------------------------- ExportedPrograms

def test_a_fresh_program_is_used_for_each_route() -> None:
    """torch.onnx.export leaves a MoE program's shape environment with unbacked symbols that break a later
    run_decompositions on the same object; each route gets a copy loaded afresh."""
    torch.manual_seed(20)
    module, args = harder.TinyMixtral(layers=1).eval(), (torch.randint(0, 100, (2, 5)),)
    program = torch.export.export(module, args)
    torch.onnx.export(program, args, dynamo=True, verbose=False)
    with pytest.raises(Exception, match="[Pp]ending unbacked"):
        program.run_decompositions()
    fresh = recipes.fresh_program(program)
    fresh.run_decompositions()
    torch.testing.assert_close(fresh.module()(*args), module(*args))


def test_a_loaded_program_is_exported_itself_once_then_as_fresh_copies() -> None:
    """A step's process loads its source for one export: that export takes the program itself (no copy); every
    later route, after torch.onnx.export has touched the program's shape environment, gets a working copy."""
    torch.manual_seed(21)
    module, args = harder.TinyMixtral(layers=1).eval(), (torch.randint(0, 100, (2, 5)),)
    program = torch.export.export(module, args)
    source = _source(module=program.module(), program=program)
    opts = _opts(["input_ids"], {})
    first = recipes.exported_program(source, args, opts)
    assert first is program
    torch.onnx.export(first, args, dynamo=True, verbose=False)  # leaves pending unbacked symbols on `program`
    second = recipes.exported_program(source, args, opts, decompose=True)
    assert second is not program
    torch.testing.assert_close(second.module()(*args), module(*args))


def test_the_torchscript_route_refuses_a_program_whose_sizes_tracing_would_fix(tmp_path: Path) -> None:
    torch.manual_seed(10)
    module, args = harder.PolarLlama(layers=1), (torch.randint(0, 100, (2, 7)),)
    program = torch.export.export(module, args, dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(RuntimeError, match="reads its dynamic sizes"):
        onnx_export.onnx_torchscript(_source(module=program.module(), program=program), args,
                                 str(tmp_path / "p.onnx"), _opts(["x"], {0: {0: "batch"}}))
    # without dynamic dims, its complex values are traced and rewritten as an archive's are
    static = torch.export.export(module, args)
    notes = onnx_export.onnx_torchscript(_source(module=static.module(), program=static), args,
                                     str(tmp_path / "s.onnx"), _opts(["x"], {}))
    assert any("aten::polar" in n for n in notes or [])
    assert_parity(module, tmp_path / "s.onnx", [args], ["x"])


def test_complex_values_in_a_program_are_named_with_what_to_do() -> None:
    text = ("## Exception summary\n<class 'DispatchError'>: No ONNX function found for <OpOverload(op='aten."
            "unsqueeze', overload='default')>. Failure message: No decompositions registered for the "
            "complex-valued input")
    found = blocker(RuntimeError(text))
    assert found.reason.startswith("complex-valued aten::unsqueeze") and "TorchScript" in (found.hint or "")


def test_an_rnn_sequence_that_torch_export_fixes_points_to_the_torchscript_route() -> None:
    text = ("Constraints violated (L['x'].size()[1])! \n  - Not all values of seq are valid because seq was "
            "inferred to be a constant (6).\n  File \"torch/nn/modules/rnn.py\", line 1120, in forward")
    assert "the torchscript route keeps it dynamic" in (blocker(RuntimeError(text)).hint or "")


# ----------------------------------------------------------------------------------------- reproduce scripts

def _top_level_names(module: types.ModuleType) -> set[str]:
    names = set()
    for node in ast.parse(module_source(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_the_modules_a_reproduce_script_carries_define_each_name_once() -> None:
    """A script concatenates its modules: a name defined twice would silently replace the other's."""
    for fmt, handler in FORMATS:
        for (route, (_, variant)) in [(r, v) for r in handler.routes for v in handler.variants]:
            for kind, builder in SOURCE_BUILDERS:
                carried = copied_modules(builder, route, variant.recipe_modules)
                recipe_module = route.recipe.__module__
                others = {m.__name__ for m in carried if m.__name__.endswith(".export")} - {recipe_module}
                # a script carries its own format's recipes, never another format's (AOTInductor's compiles the
                # ExportedProgram's, so it carries that one too)
                assert others <= {"portq.tasks.formats.exported_program.export"} and (
                    not others or fmt == "aoti"), f"{fmt}:{route.name} carries {others}"
                seen: dict[str, str] = {}
                for module in carried:
                    for name in _top_level_names(module):
                        assert name not in seen, f"{fmt}:{route.name} ({kind}): {name} in {seen.get(name)} and " \
                                                 f"{module.__name__}"
                        seen[name] = module.__name__
