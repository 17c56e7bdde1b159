"""TorchScript graph passes for archives the TorchScript-based exporter mis-reads: complex tensors, missing types.

`probe(script, args)`            runs the (inlined) forward graph once and returns every tensor value's runtime
                                 tensor (dtype, rank, sizes): loaded archives carry no types, and both passes below
                                 need them.
`lower_complex(script, args)`    rewrites complex-valued arithmetic into real tensors with a trailing dim of 2
                                 (torch.view_as_real layout), the representation ONNX's DFT uses. Rotary embeddings
                                 with torch.polar / view_as_complex (Llama), complex filters in spectral mixers
                                 (GFNet) and .abs()/.real of FFT outputs (log-mel front ends, FNet) become real
                                 ops. FFT calls stay, as `view_as_real(fft_*(view_as_complex(repr)))` islands that
                                 `symbolics.py` (TorchScript exporter) and torchlib (dynamo exporter) translate.
`annotate_types(script, sets)`   gives every tensor value its dtype and rank (sizes where they do not change
                                 between the example input sets), so symbolics that need a rank (unflatten,
                                 transpose, unfold, DFT) work on archives loaded from disk.
`typed_function(script, sets)`   what the TorchScript-based exporter is given: the frozen forward as a typed
                                 ScriptFunction whose outputs are one flat tuple (the exporter re-freezes a
                                 module, dropping the types, and has no symbolic for a returned dict).

Plain torch only; no portq imports (copied verbatim into reproduce scripts).
"""

from __future__ import annotations

from typing import Any


class LoweringError(RuntimeError):
    """A complex-valued op the lowering does not know (the message names it)."""


# ------------------------------------------------------------------------------------------------ probing

def _tensor_pairs(graph: Any, other: Any) -> list[tuple[Any, Any]]:
    """(value in graph, same value in its copy) for every top-level node output typed Tensor."""
    pairs = []
    for n1, n2 in zip(graph.nodes(), other.nodes()):
        for v1, v2 in zip(n1.outputs(), n2.outputs()):
            if v1.type().kind() == "TensorType":
                pairs.append((v1, v2))
    return pairs


def probe(script: Any, args: tuple[Any, ...]) -> dict[int, Any]:
    """{value.unique(): runtime tensor} for the top-level tensor values of `script.forward.graph` on `args`.

    The graph must be inlined already (`torch._C._jit_pass_inline`). Values that come out undefined are left out.
    """
    import torch

    graph = script.forward.graph
    copy = graph.copy()
    pairs = _tensor_pairs(graph, copy)
    n_out = len(list(copy.outputs()))
    for _, v in pairs:
        copy.registerOutput(v)
    copy.makeMultiOutputIntoTuple()
    fn = torch._C._create_function_from_graph("portq_probe", copy)
    with torch.no_grad():
        outs = fn(script._c, *args)
    found: dict[int, Any] = {}
    for (v, _), t in zip(pairs, outs[n_out:] if n_out else outs):
        if isinstance(t, torch.Tensor):
            found[v.unique()] = t
    return found


def annotate_types(script: Any, arg_sets: list[tuple[Any, ...]]) -> int:
    """Set dtype + rank on every top-level tensor value (sizes only where equal across `arg_sets`, so dims that
    vary stay symbolic). Returns the number of values typed."""
    import torch

    graph = script.forward.graph
    runs = [probe(script, args) for args in arg_sets]
    by_id = {v.unique(): v for n in graph.nodes() for v in n.outputs()}
    typed = 0
    for uid, t0 in runs[0].items():
        seen = [r.get(uid) for r in runs]
        if any(t is None or t.dim() != t0.dim() or t.dtype != t0.dtype for t in seen):
            continue
        if t0.layout != torch.strided or t0.is_nested or t0.is_complex():  # complex: an fft island's inside
            continue
        sizes = [s if len(seen) > 1 and all(t is not None and t.shape[d] == s for t in seen) else None
                 for d, s in enumerate(t0.shape)]
        by_id[uid].setType(torch._C.TensorType.create_from_tensor(t0).with_sizes(sizes))
        typed += 1
    return typed


# ------------------------------------------------------------------------------------------------ lowering

class _Lowerer:
    def __init__(self, script: Any, runtime: dict[int, Any]) -> None:
        import torch

        self.torch = torch
        self.script = script
        self.graph = script.forward.graph
        self.rt = runtime
        self.repr: dict[int, Any] = {}  # complex value id -> real (..., 2) value
        self.counts: dict[str, int] = {}
        self.node: Any = None

    # -- helpers -------------------------------------------------------------------------------------
    def is_complex(self, v: Any) -> bool:
        t = self.rt.get(v.unique())
        return t is not None and t.is_complex()

    def rank(self, v: Any) -> int:
        t = self.rt.get(v.unique())
        if t is None:
            raise LoweringError(f"no runtime value for %{v.debugName()} (needed by {self.node.kind()})")
        return t.dim()

    def const(self, value: Any) -> Any:
        with self.graph.insert_point_guard(self.node):
            return self.graph.insertConstant(value)

    def op(self, kind: str, *inputs: Any) -> Any:
        """Insert `kind(inputs)` before the node being lowered; python values become constants."""
        vals = [i if isinstance(i, self.torch._C.Value) else self.const(i) for i in inputs]
        with self.graph.insert_point_guard(self.node):
            n = self.graph.create(kind, vals, 1)
            self.graph.insertNode(n)
        n.output().setType(self.torch._C.TensorType.get())
        return n.output()

    def list_(self, kind: str, values: list[Any]) -> Any:
        vals = [v if isinstance(v, self.torch._C.Value) else self.const(v) for v in values]
        with self.graph.insert_point_guard(self.node):
            n = self.graph.create("prim::ListConstruct", vals, 1)
            self.graph.insertNode(n)
        t = self.torch._C
        n.output().setType(t.ListType(t.TensorType.get()) if kind == "tensor" else t.ListType.ofInts())
        return n.output()

    def r(self, v: Any) -> Any:
        return self.repr[v.unique()]

    def re_im(self, v: Any) -> tuple[Any, Any]:
        x = self.r(v)
        return self.op("aten::select", x, -1, 0), self.op("aten::select", x, -1, 1)

    def pair(self, re: Any, im: Any) -> Any:
        return self.op("aten::stack", self.list_("tensor", [re, im]), -1)

    def cdim(self, d: Any) -> int:
        """A dim of a complex tensor, as a dim of its (..., 2) representation."""
        dv = d.toIValue() if not isinstance(d, int) else d
        if not isinstance(dv, int):
            raise LoweringError(f"{self.node.kind()} on a complex tensor with a non-constant dim")
        return dv - 1 if dv < 0 else dv

    def ival(self, v: Any) -> Any:
        if v.node().kind() == "prim::Constant":
            return v.toIValue()
        raise LoweringError(f"{self.node.kind()} on a complex tensor with a non-constant argument")

    def sizes_plus_two(self, sizes: Any) -> Any:
        """A size list with a trailing 2 (works for constant lists and ListConstruct nodes)."""
        n = sizes.node()
        if n.kind() == "prim::Constant":
            return self.const(list(sizes.toIValue()) + [2])
        if n.kind() == "prim::ListConstruct":
            return self.list_("int", [*n.inputs(), 2])
        raise LoweringError(f"{self.node.kind()} on a complex tensor with a computed size list")

    def real_dtype(self, complex_dtype: Any) -> Any:
        return {self.torch.complex64: self.torch.float32, self.torch.complex128: self.torch.float64,
                self.torch.complex32: self.torch.float16}[complex_dtype]

    def as_complex(self, v: Any) -> Any:
        """A complex tensor for an fft input: view_as_complex of the repr (contiguous), or of (x, 0) if real."""
        if self.is_complex(v):
            x = self.r(v)
        else:
            x = self.pair(v, self.op("aten::zeros_like", v, None, None, None, None, None))
        return self.op("aten::view_as_complex", self.op("aten::contiguous", x, 0))

    def real_operand(self, v: Any) -> Any:
        """A real tensor/scalar operand broadcast against a (..., 2) repr: tensors get a trailing unsqueeze, except
        0-dim ones (traced python scalars): they broadcast as they are, and unsqueezed they would stop being
        "wrapped numbers" and promote a float32 result to float64."""
        t = self.rt.get(v.unique())
        if v.type().kind() == "TensorType" and not (t is not None and t.dim() == 0) and not (
                v.node().kind() == "prim::Constant" and v.toIValue() is not None and v.toIValue().dim() == 0):
            return self.op("aten::unsqueeze", v, -1)
        return v

    # -- the rules ----------------------------------------------------------------------------------------
    def lower(self, node: Any) -> Any | None:
        """The repr of the node's complex output, or a real value that replaces its real output."""
        k = node.kind()
        ins = list(node.inputs())
        C = self.is_complex
        if k == "aten::view_as_complex":
            return self.op("aten::contiguous", ins[0], 0)  # the real tensor already is the repr
        if k == "aten::view_as_real":
            return self.r(ins[0])
        if k == "aten::polar":
            mag, ang = ins
            return self.pair(self.op("aten::mul", mag, self.op("aten::cos", ang)),
                             self.op("aten::mul", mag, self.op("aten::sin", ang)))
        if k == "aten::complex":
            return self.pair(ins[0], ins[1])
        if k == "prim::Constant":
            t = node.output().toIValue()
            return self.const(self.torch.view_as_real(t).clone())
        if k in ("aten::real", "aten::imag"):
            return self.op("aten::select", self.r(ins[0]), -1, 0 if k == "aten::real" else 1)
        if k == "aten::abs":
            x = self.r(ins[0])
            return self.op("aten::sqrt", self.op("aten::sum", self.op("aten::mul", x, x), [-1], False, None))
        if k == "aten::angle":
            re, im = self.re_im(ins[0])
            return self.op("aten::atan2", im, re)
        if k in ("aten::conj", "aten::conj_physical", "aten::_conj"):
            re, im = self.re_im(ins[0])
            return self.pair(re, self.op("aten::neg", im))
        if k in ("aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::clone", "aten::detach"):
            return self.r(ins[0])
        if k == "aten::neg":
            return self.op("aten::neg", self.r(ins[0]))
        if k == "aten::exp":
            re, im = self.re_im(ins[0])
            e = self.op("aten::exp", re)
            return self.pair(self.op("aten::mul", e, self.op("aten::cos", im)),
                             self.op("aten::mul", e, self.op("aten::sin", im)))
        if k in ("aten::mul", "aten::div"):
            a, b = ins[0], ins[1]
            if C(a) and C(b):
                ar, ai = self.re_im(a)
                br, bi = self.re_im(b)
                if k == "aten::mul":
                    re = self.op("aten::sub", self.op("aten::mul", ar, br), self.op("aten::mul", ai, bi), 1)
                    im = self.op("aten::add", self.op("aten::mul", ar, bi), self.op("aten::mul", ai, br), 1)
                    return self.pair(re, im)
                den = self.op("aten::add", self.op("aten::mul", br, br), self.op("aten::mul", bi, bi), 1)
                re = self.op("aten::add", self.op("aten::mul", ar, br), self.op("aten::mul", ai, bi), 1)
                im = self.op("aten::sub", self.op("aten::mul", ai, br), self.op("aten::mul", ar, bi), 1)
                return self.pair(self.op("aten::div", re, den), self.op("aten::div", im, den))
            if C(a):
                return self.op(k, self.r(a), self.real_operand(b))
            if k == "aten::mul":
                return self.op(k, self.r(b), self.real_operand(a))
            raise LoweringError("real / complex division is not lowered")
        if k in ("aten::add", "aten::sub"):
            a, b = ins[0], ins[1]
            alpha = ins[2] if len(ins) > 2 else self.const(1)
            if C(a) and C(b):
                return self.op(k, self.r(a), self.r(b), alpha)
            # complex +- real: only the real part moves
            if C(a):
                re, im = self.re_im(a)
                return self.pair(self.op(k, re, b, alpha), im)
            re, im = self.re_im(b)
            new_re = self.op(k, a, re, alpha)
            new_im = self.op("aten::mul", im, -1) if k == "aten::sub" else im
            if k == "aten::sub" and self.ival(alpha) != 1:
                new_im = self.op("aten::mul", new_im, alpha)
            return self.pair(new_re, new_im)
        if k == "aten::unsqueeze":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]))
        if k == "aten::squeeze" and len(ins) == 2 and ins[1].type().kind() == "IntType":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]))
        if k == "aten::slice":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]), *ins[2:])
        if k == "aten::select":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]), ins[2])
        if k == "aten::narrow":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]), ins[2], ins[3])
        if k == "aten::transpose":
            return self.op(k, self.r(ins[0]), self.cdim(ins[1]), self.cdim(ins[2]))
        if k == "aten::permute":
            dims = [self.cdim(d) for d in self.ival(ins[1])] if ins[1].node().kind() == "prim::Constant" else \
                [self.cdim(d) for d in ins[1].node().inputs()]
            return self.op(k, self.r(ins[0]), dims + [self.rank(ins[0])])
        if k in ("aten::reshape", "aten::view"):
            return self.op(k, self.r(ins[0]), self.sizes_plus_two(ins[1]))
        if k == "aten::expand":
            return self.op(k, self.r(ins[0]), self.sizes_plus_two(ins[1]), ins[2])
        if k == "aten::flatten":
            s, e = self.ival(ins[1]), self.ival(ins[2])
            rank = self.rank(ins[0])
            s, e = s % rank if rank else 0, e % rank if rank else 0
            return self.op(k, self.r(ins[0]), s, e)
        if k == "aten::repeat_interleave" and len(ins) == 4 and ins[1].type().kind() == "IntType":
            return self.op(k, self.r(ins[0]), ins[1], self.cdim(ins[2]), ins[3])
        if k in ("aten::cat", "aten::stack"):
            parts = list(ins[0].node().inputs())
            if ins[0].node().kind() != "prim::ListConstruct":
                raise LoweringError(f"{k} of a computed list of complex tensors")
            reprs = [self.r(p) if C(p) else self.pair(p, self.op("aten::zeros_like", p, None, None, None, None, None))
                     for p in parts]
            return self.op(k, self.list_("tensor", reprs), self.cdim(ins[1]))
        if k in ("aten::sum", "aten::mean") and len(ins) >= 3:
            dims = self.ival(ins[1])
            dims = [self.cdim(d) for d in (dims if dims is not None else range(self.rank(ins[0])))]
            return self.op(k, self.r(ins[0]), dims, ins[2], None)
        if k in ("aten::to", "aten::type_as"):
            out_t = self.rt.get(node.output().unique())
            if out_t is None or not out_t.is_complex():
                raise LoweringError(f"{k} from complex to a real dtype drops the imaginary part; not lowered")
            return self.op("aten::to", self.r(ins[0]), self.real_dtype(out_t.dtype), False, False, None)
        if k.startswith("aten::fft_"):
            return self.lower_fft(node, ins)
        raise LoweringError(f"complex-valued {k} is not lowered (rewrite it in real arithmetic, e.g. with cos/sin)")

    def lower_fft(self, node: Any, ins: list[Any]) -> Any:
        k = node.kind()
        x = ins[0]
        if k in ("aten::fft_rfft", "aten::fft_rfftn", "aten::fft_rfft2"):
            if self.is_complex(x):
                raise LoweringError(f"{k} of a complex tensor")
            first = x
        else:
            first = self.as_complex(x)
        with self.graph.insert_point_guard(node):
            n = self.graph.create(k, [first, *ins[1:]], 1)
            self.graph.insertNode(n)
        n.output().setType(self.torch._C.TensorType.get())
        out = n.output()
        if self.is_complex(node.output()):
            return self.op("aten::view_as_real", out)
        return out  # irfft / hfft: real output

    # -- driver ---------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        import torch

        for node in list(self.graph.nodes()):
            if node.kind() == "prim::GetAttr" and self.is_complex(node.output()):
                self.lift_complex_attr(node)
                continue
            outs_c = [self.is_complex(o) for o in node.outputs()]
            ins_c = [self.is_complex(i) for i in node.inputs()]
            if not (any(outs_c) or any(ins_c)):
                continue
            if node.kind() == "prim::ListConstruct":
                continue  # lists of complex tensors are read by their consumer (cat / stack)
            if node.kind() in ("prim::Return", "prim::TupleConstruct", "prim::DictConstruct"):
                raise LoweringError("the model returns a complex tensor; ONNX has no complex outputs")
            if node.kind().startswith("prim::") and node.kind() != "prim::Constant":
                raise LoweringError(f"complex values flow through {node.kind()}")
            if list(node.blocks()):
                raise LoweringError(f"complex values inside control flow ({node.kind()})")
            self.node = node
            result = self.lower(node)
            assert result is not None, node.kind()
            self.counts[node.kind()] = self.counts.get(node.kind(), 0) + 1
            out = node.output()
            if outs_c[0]:
                self.repr[out.unique()] = result
                # keep runtime info for the repr (rank + 1) for later rules needing a rank
                self.rt[result.unique()] = torch.view_as_real(self.rt[out.unique()].resolve_conj())
            else:
                out.replaceAllUsesWith(result)
        # every complex node is dead now (its consumers were rewritten)
        torch._C._jit_pass_dce(self.graph)
        left = [n.kind() for n in self.graph.nodes() if any(self.is_complex(o) for o in n.outputs())]
        if left:
            raise LoweringError(f"complex values remain after lowering: {sorted(set(left))}")
        return [f"lowered {n} x complex {k}" for k, n in sorted(self.counts.items())]

    def lift_complex_attr(self, node: Any) -> None:
        """A complex buffer/attribute: store its view_as_real copy as a new buffer and read that instead."""
        import torch

        owner = node.input()
        name = node.s("name")
        value = self.rt[node.output().unique()]
        new_name = f"{name}__as_real"
        # the owning module of this GetAttr: walk the GetAttr chain from self
        path = []
        cur = owner
        while cur.node().kind() == "prim::GetAttr":
            path.append(cur.node().s("name"))
            cur = cur.node().input()
        mod = self.script
        for p in reversed(path):
            mod = getattr(mod, p)
        if not hasattr(mod, new_name):
            as_real = torch.view_as_real(value.resolve_conj()).clone()
            mod._c._register_attribute(new_name, torch._C.TensorType.get(), as_real)
        with self.graph.insert_point_guard(node):
            n = self.graph.create("prim::GetAttr", [owner], 1)
            n.s_("name", new_name)
            self.graph.insertNode(n)
        n.output().setType(torch._C.TensorType.get())
        self.repr[node.output().unique()] = n.output()
        self.rt[n.output().unique()] = torch.view_as_real(value.resolve_conj())
        self.counts["buffer"] = self.counts.get("buffer", 0) + 1


def lower_complex(script: Any, args: tuple[Any, ...]) -> list[str]:
    """Lower the complex values of `script.forward.graph` (inlined) in place; returns notes (empty if none)."""
    runtime = probe(script, args)
    if not any(t.is_complex() for t in runtime.values()):
        return []
    return _Lowerer(script, runtime).run()


class _Frozen:
    """What `probe` needs of a module: `.forward.graph` and `._c` (the frozen module)."""

    def __init__(self, module_c: Any) -> None:
        self._c = module_c
        self.forward = module_c._get_method("forward")


def typed_function(script: Any, arg_sets: list[tuple[Any, ...]]) -> Any:
    """A ScriptFunction of the frozen forward graph with every value typed (dtype + rank) for the exporter.

    torch.onnx.export(dynamo=False) freezes a ScriptModule itself (`torch._C._freeze_module`), which drops value
    types, so types set on a module's graph never reach the symbolics. A ScriptFunction is exported as is: freeze
    here (weights become graph constants), annotate, drop the unused `self` input, return the outputs as one flat
    tuple (the exporter has no symbolic for a returned dict), wrap.
    """
    import torch

    frozen = torch._C._freeze_module(script._c, preserveParameters=False)
    holder = _Frozen(frozen)
    annotate_types(holder, arg_sets)
    graph = holder.forward.graph
    if list(graph.inputs())[0].uses():
        raise RuntimeError("the frozen forward still reads module attributes; cannot make a function of it")
    graph.eraseInput(0)
    _flatten_graph_outputs(graph)
    return torch._C._create_function_from_graph("forward", graph)


def _flatten_graph_outputs(graph: Any) -> None:
    """Return the tensors of nested tuples, lists and dicts (dict values in order) as one flat tuple: the order in
    which portq names outputs (`output.0`, `output.logits`, ...)."""
    import torch

    flat: list[Any] = []

    def walk(value: Any) -> None:
        node = value.node()
        if node.kind() == "prim::DictConstruct":
            for item in list(node.inputs())[1::2]:
                walk(item)
        elif node.kind() in ("prim::TupleConstruct", "prim::ListConstruct"):
            for item in node.inputs():
                walk(item)
        else:
            flat.append(value)

    outputs = list(graph.outputs())
    for value in outputs:
        walk(value)
    if flat == outputs:
        return
    for i in reversed(range(len(outputs))):
        graph.eraseOutput(i)
    for value in flat:
        graph.registerOutput(value)
    if len(flat) > 1:
        graph.makeMultiOutputIntoTuple()
    torch._C._jit_pass_dce(graph)
