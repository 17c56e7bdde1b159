"""Dynamically quantized models (torch.ao.quantization.quantize_dynamic) -> their float equivalent, for export.

quantize_dynamic swaps nn.Linear / nn.LSTM / nn.GRU for modules that hold int8 weights packed into opaque torchbind
objects (LinearPackedParamsBase, CellParamsBase) and quantize activations at run time. A TorchScript archive of such
a model calls `quantized::linear_dynamic` and `aten::quantized_lstm` / `aten::quantized_gru` on those objects, which
no ONNX exporter translates (nor can TS2EPConverter trace torchbind objects it cannot fake).

Both kinds of submission can be turned back into float:
  `dequantize_module(m)`   a pickled nn.Module (torch.save(model)): each dynamic quantized Linear/LSTM/GRU is
                           replaced by the float module with `weight.dequantize()` (biases are float already)
  `dequantize_script(s)`   a TorchScript archive: frozen (packed weights become graph constants), then each packed
                           weight is unpacked (torch.ops.quantized.linear_unpack) into float tensor constants, and
                           linear_dynamic -> aten::linear, quantized_lstm -> aten::lstm
The result computes in float32 with the int8 weights' values: it matches a float model with those weights exactly,
and differs from the int8 model by its activation quantization error (`FLOAT_NOTE` says so, in the job's report).
portq builds every source through `float_equivalent` (`portq.tasks.sources.loading`, and the reproduce scripts'
`build_source`), so parity holds each artifact to the float equivalent.

Statically quantized graphs (quantized::linear, quantized::conv2d, quantize_per_tensor with fixed scales: activations
are int8 tensors between ops) are refused with `UNSUPPORTED_STATIC`.

Plain torch only (no portq imports): reproduce scripts carry a copy.
"""

from __future__ import annotations

import copy
from typing import Any

FLOAT_NOTE = ("exported as the float equivalent of a dynamically quantized model: its int8 weights were "
              "dequantized to float32 and activations are no longer quantized at run time, so the artifacts (and "
              "their parity) match a float model with these weights and differ from the int8 model by its "
              "quantization error; for int8 inference ask for an int8 optimization variant of the ONNX artifact "
              "(onnxruntime dynamic quantization: MatMulInteger / DynamicQuantizeLinear), not this float export")

UNSUPPORTED_STATIC = ("statically quantized graph ({ops}): activations are int8 tensors with fixed scales between "
                      "ops, so there is no float equivalent to export by dequantizing weights alone; submit the "
                      "float model (state dict with --arch) and use portq's int8 optimization variant instead")

DYNAMIC_TS_OPS = ("quantized::linear_dynamic", "quantized::linear_dynamic_fp16", "aten::quantized_lstm",
                  "aten::quantized_gru")
STATIC_TS_OPS = ("quantized::linear", "quantized::conv2d", "quantized::conv1d", "quantized::add",
                 "aten::quantize_per_tensor", "quantized::linear_relu", "quantized::conv2d_relu", "aten::dequantize")


class DequantError(RuntimeError):
    """The model is quantized in a way that has no float equivalent here (the message says why and what to do)."""


def float_equivalent(model: Any) -> tuple[Any, list[str]]:
    """The float equivalent of a dynamically quantized model (a TorchScript archive or a pickled nn.Module), and
    notes saying so; the model itself and no notes when nothing in it is quantized."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return dequantize_script(model)
    if isinstance(model, torch.nn.Module):
        return dequantize_module(model)
    return model, []


# ----------------------------------------------------------------------------------------- pickled modules

def _unpack_linear(packed: Any) -> tuple[Any, Any]:
    """(float weight, bias or None) of a LinearPackedParamsBase (int8 or fp16)."""
    import torch

    try:
        w, b = torch.ops.quantized.linear_unpack(packed)
    except RuntimeError:
        w, b = torch.ops.quantized.linear_unpack_fp16(packed)
    w = w.dequantize() if w.is_quantized else w.float()
    # detached copies: graph constants cannot require grad
    return w.detach().clone(), (b.detach().float().clone() if b is not None else None)


def _rnn_float(qmod: Any) -> Any:
    import torch.nn as nn

    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}[qmod.mode]
    f = cls(qmod.input_size, qmod.hidden_size, num_layers=qmod.num_layers, bias=qmod.bias,
            batch_first=qmod.batch_first, dropout=float(qmod.dropout), bidirectional=qmod.bidirectional)
    wb = qmod._weight_bias()
    state = {k: (v.dequantize() if v.is_quantized else v.float()) for k, v in wb["weight"].items()}
    if qmod.bias:
        state.update({k: v.float() for k, v in wb["bias"].items()})
    f.load_state_dict(state)
    return f.eval()


def dequantize_module(module: Any) -> tuple[Any, list[str]]:
    """A float copy of a pickled dynamically quantized module, and notes (empty when nothing was quantized)."""
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.nn as nn

    static = [n for n, m in module.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized.modules")
              and type(m).__name__ != "LinearPackedParams"]  # the packed weights of dynamic Linear live there too
    if static:
        raise DequantError(UNSUPPORTED_STATIC.format(ops=", ".join(static[:3])))
    out = copy.deepcopy(module)
    swapped: list[str] = []
    for name, sub in list(out.named_modules()):
        if isinstance(sub, nnqd.Linear):
            w, b = _unpack_linear(sub._packed_params._packed_params)
            f = nn.Linear(sub.in_features, sub.out_features, bias=b is not None)
            f.weight.data.copy_(w)
            if b is not None:
                f.bias.data.copy_(b)
        elif isinstance(sub, (nnqd.LSTM, nnqd.GRU)):
            f = _rnn_float(sub)
        else:
            continue
        parent = out.get_submodule(name.rsplit(".", 1)[0]) if "." in name else out
        if name:
            setattr(parent, name.rsplit(".", 1)[-1], f)
        else:
            out = f
        swapped.append(f"{name or '<root>'}: {type(sub).__module__}.{type(sub).__name__} -> nn.{type(f).__name__}")
    if not swapped:
        return module, []
    return out.eval(), [FLOAT_NOTE, *swapped]


# ------------------------------------------------------------------------------------- TorchScript archives

def _object(value: Any, what: str) -> Any:
    """The torchbind object behind a constant input of the frozen graph."""
    obj = value.toIValue() if value.node().kind() == "prim::Constant" else None
    if obj is None:
        raise DequantError(f"{what}: the packed weights are not a constant of the frozen archive")
    return obj


def _list_elements(value: Any) -> tuple[list[Any], list[Any]]:
    """(element values, nodes that build the list) for a list made by ListConstruct and then aten::append (the
    form a scripted loop over a ModuleList takes once frozen)."""
    node = value.node()
    if node.kind() != "prim::ListConstruct":
        raise DequantError(f"packed cell parameters come from {node.kind()}, not a list literal")
    appends = sorted((u.user for u in value.uses() if u.user.kind() == "aten::append"),
                     key=lambda n: sum(1 for other in value.uses() if other.user.isBefore(n)))
    return [*node.inputs(), *(a.inputsAt(1) for a in appends)], [*appends, node]


def quantized_ops(script: Any) -> tuple[list[str], list[str]]:
    """(dynamic quantized ops, static quantized ops) in the archive's inlined forward graph."""
    graph = script.inlined_graph
    dyn = sorted({n.kind() for k in DYNAMIC_TS_OPS for n in graph.findAllNodes(k)})
    static = sorted({n.kind() for k in STATIC_TS_OPS for n in graph.findAllNodes(k)})
    return dyn, static


def dequantize_script(script: Any) -> tuple[Any, list[str]]:
    """A float copy of a dynamically quantized TorchScript archive (see the module doc), and notes.

    The copy is frozen first (torch.jit.freeze): packed weights become graph constants, whatever path (module
    attributes, a scripted loop over a ModuleList) the archive read them by; the float weights replace them as
    tensor constants."""
    import io

    import torch

    dyn, static = quantized_ops(script)
    if static:
        raise DequantError(UNSUPPORTED_STATIC.format(ops=", ".join(static)))
    if not dyn:
        return script, []
    buf = io.BytesIO()
    torch.jit.save(script, buf)
    buf.seek(0)
    clone = torch.jit.load(buf, map_location="cpu").eval()
    frozen = torch.jit.freeze(clone, optimize_numerics=False)
    graph = frozen.forward.graph
    counts: dict[str, int] = {}
    dead: list[Any] = []
    # findAllNodes recurses into blocks: scripted archives branch on the packed weight's dtype (int8 / fp16)
    for node in [n for k in DYNAMIC_TS_OPS for n in graph.findAllNodes(k)]:
        kind = node.kind()
        if kind in ("quantized::linear_dynamic", "quantized::linear_dynamic_fp16"):
            w, b = _unpack_linear(_object(node.inputsAt(1), kind))
            with graph.insert_point_guard(node):
                lin = graph.create("aten::linear", [node.inputsAt(0), graph.insertConstant(w),
                                                    graph.insertConstant(b)], 1)
                graph.insertNode(lin)
            lin.output().setType(torch._C.TensorType.get())
            node.output().replaceAllUsesWith(lin.output())
            node.destroy()
        elif kind == "aten::quantized_lstm":
            ins = list(node.inputs())
            has_biases = ins[3].toIValue()
            if not isinstance(has_biases, bool):
                raise DequantError(f"{kind}: has_biases is not a constant")
            elements, builders = _list_elements(ins[2])
            tensors = []
            for v in elements:
                packed_ih, packed_hh = _object(v, kind).__getstate__()[0][4][:2]
                (w_ih, b_ih), (w_hh, b_hh) = _unpack_linear(packed_ih), _unpack_linear(packed_hh)
                tensors += [w_ih, w_hh, b_ih, b_hh] if has_biases else [w_ih, w_hh]
            with graph.insert_point_guard(node):
                consts = [graph.insertConstant(t) for t in tensors]
                lst = graph.create("prim::ListConstruct", consts, 1)
                graph.insertNode(lst)
                lst.output().setType(torch._C.ListType(torch._C.TensorType.get()))
                # aten::lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                #                  batch_first): the float op, same arguments minus dtype/use_dynamic
                new = graph.create("aten::lstm", [ins[0], ins[1], lst.output(), *ins[3:9]], 3)
                graph.insertNode(new)
            for old, o in zip(node.outputs(), new.outputs()):
                o.setType(torch._C.TensorType.get())
                old.replaceAllUsesWith(o)
            node.destroy()
            dead += builders
        else:  # aten::quantized_gru: same idea with 3 gates; not needed by the models seen so far
            raise DequantError(f"{kind} is not rewritten (only quantized Linear and LSTM are)")
        counts[kind] = counts.get(kind, 0) + 1
    for n in dead:  # the list of packed objects and its appends (side-effecting, so DCE keeps them)
        if not any(o.uses() for o in n.outputs()) or n.kind() == "aten::append":
            n.destroy()
    torch._C._jit_pass_dce(graph)
    left, _ = quantized_ops(frozen)
    if left:
        raise DequantError(f"quantized ops left after the rewrite: {', '.join(left)}")
    return frozen, [FLOAT_NOTE, *(f"rewrote {n} x {k} into float ops" for k, n in sorted(counts.items()))]
