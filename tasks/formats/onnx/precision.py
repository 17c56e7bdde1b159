"""Lossy ONNX optimization recipes: half precision (with the mixed-precision repair) and int8
quantization. portq's lossy variants run them, and their reproduce scripts carry a copy of this file's
source after `optimize`'s and `transformer`'s, whose helpers it uses. Plain functions, as in `optimize`.

`fp16_repair` is portq's repair for a half-precision artifact that fails parity: it compares the fp32
and fp16 models' intermediate tensors in topological order (a first-divergence search on the ONNX
graph), keeps the nodes where the error starts (and the consumers of values beyond fp16's range) in
float32, converts again, and repeats until parity passes or nothing new is found.
"""

from __future__ import annotations

import os
import tempfile

from portq.tasks.formats.onnx.optimize import (  # portq-only
    _CPU_EXTRA_FP16_BLOCK,
    FP16_MAX,
    _dummy_feeds,
    _ensure_node_names,
    _graph_facts,
    _has_external_data,
    _load,
    _load_with,
    _save,
    _session,
    _toposort,
    load_samples,
)
from portq.tasks.formats.onnx.transformer import transformer_profile  # portq-only


# ============================================================================= fp16
def _drop_fp16_roundtrips(graph) -> int:
    """Remove Cast(fp32->fp16) -> Cast(fp16->fp32) round trips; consumers read the fp32 source.

    float16.convert_float_to_float16 inserts such a pair between every two *adjacent*
    blocked nodes, so a block list alone cannot keep an overflowing activation in fp32:
    the round trip turns it into inf. Removing the pair is lossless (it only skips a
    rounding step) and makes node_block_list mean "this region stays fp32"."""
    from onnx import TensorProto

    def to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename, drop = {}, set()
    for n in graph.node:
        if n.op_type == "Cast" and to(n) == TensorProto.FLOAT:
            src = producer.get(n.input[0])
            if (src is not None and src.op_type == "Cast" and to(src) == TensorProto.FLOAT16
                    and n.output[0] not in outputs):
                rename[n.output[0]] = src.input[0]
                drop.add(id(n))
    if not rename:
        return 0
    keep = [n for n in graph.node if id(n) not in drop]
    for n in keep:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    used = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if not (n.op_type == "Cast" and to(n) == TensorProto.FLOAT16 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(drop)


def fp16(in_path: str, out_path: str, opts: dict) -> dict:
    """fp16 conversion with onnxruntime.transformers.float16 (the copy Optimum/ORT use;
    onnxconverter_common is not needed). keep_io_types=True by default so callers keep
    feeding fp32. opts: op_block_list (added to the converter's default list rather than
    replacing it), node_block_list (node names kept in fp32, see fp16_repair),
    keep_io_types, smoke_test (default True: prove ORT CPU loads and runs it).

    Note: on the CPU EP fp16 is a storage format only: ORT inserts Cast-to-fp32 around
    every op without an fp16 CPU kernel (almost all math), so it is slower than fp32 and
    only worth it for CUDA/TensorRT/DirectML targets."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _load(in_path)
    renamed = _ensure_node_names(model)
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(_CPU_EXTRA_FP16_BLOCK) | set(opts.get("op_block_list", [])))
    node_block = list(opts.get("node_block_list", []))
    known = {n.name for n in model.graph.node}
    missing = [n for n in node_block if n not in known]
    m16 = convert_float_to_float16(model, keep_io_types=bool(opts.get("keep_io_types", True)),
                                   op_block_list=op_block, node_block_list=node_block,
                                   disable_shape_infer=bool(opts.get("disable_shape_infer", False)))
    roundtrips = _drop_fp16_roundtrips(m16.graph)
    _toposort(m16.graph)
    external = _save(m16, out_path, _has_external_data(in_path) or None)
    facts = _graph_facts(model, m16)
    facts.update({"keep_io_types": bool(opts.get("keep_io_types", True)), "node_block_list": node_block,
                  "nodes_kept_fp32": len([n for n in node_block if n in known]), "unknown_block_nodes": missing,
                  "nodes_renamed": renamed, "op_block_list_extra": sorted(set(opts.get("op_block_list", []))),
                  "fp16_roundtrips_removed": roundtrips, "external_data": external, "lossy": True,
                  "load_with": _load_with(opts)})
    if opts.get("smoke_test", True):
        s = _session(out_path)
        s.run(None, _dummy_feeds(s))
        facts["cpu_runs"] = True
    return facts


# ============================================================================= int8
def _preprocess_for_quant(in_path: str, out_path: str, opts: dict) -> dict:
    """quant_pre_process = symbolic shape inference + ORT basic optimisation + ONNX shape
    inference. Shapes let the quantizer quantize MatMuls whose weight rank it must know;
    the optimisation folds e.g. Transpose(weight) so weights become plain initializers.
    Falls back to skipping symbolic shape inference when it fails (it does on some
    dynamo graphs)."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    in_path, out_path = os.path.abspath(in_path), os.path.abspath(out_path)
    ext = _has_external_data(in_path)
    kw = dict(save_as_external_data=ext, all_tensors_to_one_file=True,
              external_data_location=os.path.basename(out_path) + ".data" if ext else None)
    skip_opt = bool(opts.get("pre_skip_optimization", False))
    # onnxruntime's symbolic shape inference, when it cannot finish, saves its partial model into the working
    # directory ("sym_shape_infer_temp.onnx" and a uuid-named .data file): run it in a scratch folder, not the user's
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="portq-shape-infer-") as scratch:
        os.chdir(scratch)
        try:
            quant_pre_process(in_path, out_path, skip_optimization=skip_opt, **kw)
            return {"preprocess": "quant_pre_process", "symbolic_shape": True}
        except Exception as e:  # noqa: BLE001 - fall back, record why
            quant_pre_process(in_path, out_path, skip_optimization=skip_opt, skip_symbolic_shape=True, **kw)
            return {"preprocess": "quant_pre_process", "symbolic_shape": False, "symbolic_error": str(e)[:200]}
        finally:
            os.chdir(here)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8, "s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    return types[name.lower()]


def int8_dynamic(in_path: str, out_path: str, opts: dict) -> dict:
    """Dynamic (weight-only calibration-free) int8: weights quantized offline, activations
    quantized per batch at run time (DynamicQuantizeLinear + MatMulInteger, fused by ORT
    into DynamicQuantizeMatMul / MatMulIntegerToFloat).

    Defaults (measured fastest+accurate on AVX-512-VNNI/AVX2 x86): weight_type QInt8
    (u8 activations x s8 weights is the VNNI/AVX2 fast path), per_channel False,
    reduce_range False (set True on pre-VNNI AVX2/AVX-512 CPUs to avoid vpmaddubsw
    saturation), op_types MatMul+Gemm+Attention (Conv -> ConvInteger is slow on CPU and
    is left fp32 unless op_types asks for it)."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    op_types = list(opts.get("op_types", ["MatMul", "Gemm", "Attention"]))
    per_channel = bool(opts.get("per_channel", False))
    wtype = str(opts.get("weight_type", "QInt8"))
    with tempfile.TemporaryDirectory() as td:
        src = in_path
        pre = {"preprocess": "none"}
        if opts.get("preprocess", True):
            src = os.path.join(td, "pre.onnx")
            pre = _preprocess_for_quant(in_path, src, opts)
        ext = _has_external_data(src)
        quantize_dynamic(src, out_path, op_types_to_quantize=op_types, per_channel=per_channel,
                         reduce_range=bool(opts.get("reduce_range", False)), weight_type=_qtype(wtype),
                         nodes_to_exclude=list(opts.get("nodes_to_exclude", [])), use_external_data_format=ext,
                         extra_options=dict(opts.get("extra_options", {"MatMulConstBOnly": True})))
    facts = _graph_facts(_load(in_path), onnx.load(out_path, load_external_data=False))
    facts.update(pre)
    facts.update({"op_types": op_types, "per_channel": per_channel, "weight_type": wtype,
                  "reduce_range": bool(opts.get("reduce_range", False)), "lossy": True,
                  "load_with": _load_with(opts)})
    return facts


class _NpzReader:
    """CalibrationDataReader over a list of {input_name: ndarray} dicts."""

    def __init__(self, samples: list):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # ORT calls this only for some calibrators; keep the protocol complete
        pass


def int8_static(in_path: str, out_path: str, opts: dict) -> dict:
    """Static int8 in QDQ format (the format ORT's CPU EP fuses into QLinearConv /
    QLinearMatMul / QGemm), per-channel weights, activation ranges calibrated on real
    samples. opts: calibration (path of .npz written by save_samples; required),
    per_channel (True), activation_type (QUInt8), weight_type (QInt8), calibrate_method
    ('minmax'|'entropy'|'percentile'), op_types ('auto': Conv/MatMul/Gemm for
    transformer-like graphs, every supported op otherwise), nodes_to_exclude, reduce_range.
    u8 activations x s8 weights is the x86 fast path (s8 activations measured 2.8x slower on
    the CNN, 1.3x on the transformer)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    if "calibration" not in opts:
        raise ValueError("int8_static needs opts['calibration'] = path to an .npz of samples")
    samples = load_samples(opts["calibration"])
    reader_cls = type("NpzReader", (_NpzReader, CalibrationDataReader), {})
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.get("calibrate_method", "minmax")]
    op_types = opts.get("op_types", "auto")
    if op_types == "auto":
        # Transformers: quantizing residual Adds / LayerNorm inputs / Softmax costs ~4x the
        # error (measured 0.128 vs 0.033 abs on the 2-layer encoder) for 5% speed, so only
        # the GEMM-like ops. CNNs: quantize everything so Conv->Relu->Add chains stay int8
        # end to end (QLinear* fusion; 12.1 vs 13.0 ms for Conv/MatMul/Gemm-only QDQ).
        op_types = ["Conv", "MatMul", "Gemm"] if transformer_profile(_load(in_path))["transformer_like"] else None
    per_channel = bool(opts.get("per_channel", True))
    with tempfile.TemporaryDirectory() as td:
        src = in_path
        pre = {"preprocess": "none"}
        if opts.get("preprocess", True):
            src = os.path.join(td, "pre.onnx")
            pre = _preprocess_for_quant(in_path, src, opts)
        quantize_static(src, out_path, reader_cls(samples), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=per_channel,
                        reduce_range=bool(opts.get("reduce_range", False)),
                        activation_type=_qtype(opts.get("activation_type", "QUInt8")),
                        weight_type=_qtype(opts.get("weight_type", "QInt8")),
                        nodes_to_exclude=list(opts.get("nodes_to_exclude", [])),
                        use_external_data_format=_has_external_data(src), calibrate_method=method,
                        extra_options=dict(opts.get("extra_options", {})))
    facts = _graph_facts(_load(in_path), onnx.load(out_path, load_external_data=False))
    facts.update(pre)
    facts.update({"format": "QDQ", "per_channel": per_channel, "calibration_samples": len(samples),
                  "calibrate_method": opts.get("calibrate_method", "minmax"), "op_types": op_types, "lossy": True,
                  "load_with": _load_with(opts)})
    return facts




# ====================================================================== fp16 repair
def run_with_intermediates(model_path: str, samples: list, names: list, level: str = "ORT_ENABLE_ALL",
                           chunk: int = 256) -> list:
    """Run a copy of the model whose graph outputs are extended with `names`.

    Returns one {tensor_name: ndarray} dict per sample (only names the model has).
    Outputs are added without type info (ORT infers it), in chunks so very large graphs
    do not keep every activation alive at once."""
    import onnx

    base = _load(model_path)
    produced = {o for n in base.graph.node for o in n.output}
    names = [n for n in names if n in produced]
    results: list = [dict() for _ in samples]
    for start in range(0, max(len(names), 1), chunk):
        part = names[start:start + chunk]
        m = onnx.ModelProto()
        m.CopyFrom(base)
        existing = {o.name for o in m.graph.output}
        for nm in part:
            if nm not in existing:
                m.graph.output.append(onnx.ValueInfoProto(name=nm))
        with tempfile.TemporaryDirectory() as td:
            p = os.path.join(td, "probe.onnx")
            _save(m, p)
            sess = _session(p, level)
            out_names = [o.name for o in sess.get_outputs()]
            for i, feeds in enumerate(samples):
                vals = sess.run(None, feeds)
                results[i].update({k: v for k, v in zip(out_names, vals) if k in part or k in existing})
    return results


def _tensor_bad(ref, got, atol: float, rtol: float) -> tuple:
    """(bad, reason) for one intermediate tensor: new non-finite values, or an error larger
    than atol + rtol * max|ref| (scale-relative, so big activations are judged fairly)."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float32)
    got = np.asarray(got).astype(np.float32)
    if ref.shape != got.shape:
        return False, "shape"
    fin = np.isfinite(ref)
    if (fin & ~np.isfinite(got)).any():
        return True, "nonfinite"
    if not fin.any():
        return False, ""
    scale = float(np.abs(ref[fin]).max())
    err = float(np.abs(ref[fin] - got[fin]).max())
    return (err > atol + rtol * scale), f"err={err:.3g} scale={scale:.3g}"


def fp16_block_list(fp32_path: str, fp16_path: str, samples: list, atol: float, rtol: float,
                    already_blocked: list | None = None) -> list:
    """Nodes (names, topological order) that should stay fp32 to fix `fp16_path`.

    Two rules, both needed:
      range:  a node whose fp32 output exceeds the fp16 range (|x| > 65504) must stay fp32,
              and so must every consumer of that tensor (an fp16 consumer gets inf through
              the Cast the converter inserts). Detected from the fp32 run alone, so it also
              catches overflow an EP hides by computing in fp32 internally.
      origin: a node whose fp16 output is non-finite or off by > atol + rtol*max|ref| while
              none of its inputs were bad (error starts here, not inherited). If the node
              is already blocked, the damage comes from a Cast next to it: block its
              consumers (non-finite output) and the nearest unblocked producers of its
              inputs (precision lost by rounding an input to fp16). fp16_repair iterates.
    """
    import numpy as np

    m32 = _load(fp32_path)
    already = set(already_blocked or [])
    nodes = list(m32.graph.node)
    producer = {o: n.name for n in nodes for o in n.output}
    consumers: dict = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    order = {n.name: k for k, n in enumerate(nodes)}
    names = [o for n in nodes for o in n.output if o]
    ref_runs = run_with_intermediates(fp32_path, samples, names, level="ORT_DISABLE_ALL")
    got_runs = run_with_intermediates(fp16_path, samples, names, level="ORT_ENABLE_ALL")

    def is_float(a):
        return isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float16, np.float64)

    block: set = set()
    bad_tensors: set = set()
    for n in nodes:
        for o in n.output:
            refs = [r.get(o) for r in ref_runs]
            if not refs or not all(is_float(r) for r in refs):
                continue
            if max(float(np.abs(r[np.isfinite(r)]).max(initial=0.0)) for r in refs) > FP16_MAX:
                block.add(n.name)
                block.update(consumers.get(o, []))
            for r, g in zip(ref_runs, got_runs):
                if o in g and is_float(g[o]) and _tensor_bad(r[o], g[o], atol, rtol)[0]:
                    bad_tensors.add(o)
                    break
    by_name = {n.name: n for n in nodes}

    def upstream_unblocked(node) -> set:
        """Nearest producers of `node`'s inputs that are not yet blocked (walks through
        blocked ones): where a rounded fp16 tensor that feeds `node` is produced."""
        found, stack, seen = set(), [node], set()
        while stack:
            cur = stack.pop()
            for i in cur.input:
                p = producer.get(i)
                if p is None or p in seen:
                    continue
                seen.add(p)
                if p in already or p in block:
                    stack.append(by_name[p])
                else:
                    found.add(p)
        return found

    for n in nodes:
        if not any(o in bad_tensors for o in n.output):
            continue
        if any(i in bad_tensors and i in producer for i in n.input):
            continue  # inherited error: the origin is upstream
        if n.name not in already:
            block.add(n.name)
            continue
        # Already fp32 and still the origin: either its output cast overflows (block the
        # consumers) or it amplifies the rounding of an fp16 input (keep that input's
        # producer chain in fp32 too, e.g. (x + 3000) -> Reshape -> (- 3000)).
        nonfinite = any(_tensor_bad(r.get(o), g.get(o), atol, rtol)[1] == "nonfinite"
                        for o in n.output for r, g in zip(ref_runs, got_runs) if o in g and o in r)
        if nonfinite:
            for o in n.output:
                block.update(consumers.get(o, []))
        block.update(upstream_unblocked(n))
    return sorted((b for b in block if b not in already and b in order), key=lambda b: order[b])


def parity(ref_path: str, test_path: str, samples: list, atol: float, rtol: float,
           ref_level: str = "ORT_DISABLE_ALL", test_level: str = "ORT_ENABLE_ALL") -> dict:
    """Compare all graph outputs of two ONNX models on samples: allclose + all finite."""
    import numpy as np

    a, b = _session(ref_path, ref_level), _session(test_path, test_level)
    worst, finite, ok = 0.0, True, True
    for feeds in samples:
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.float32)
            finite &= bool(np.isfinite(y).all() or not np.isfinite(x).all())
            d = np.abs(x - y)
            worst = max(worst, float(np.nanmax(d)) if np.isfinite(d).any() else float("inf"))
            ok &= bool(np.allclose(y, x, atol=atol, rtol=rtol))
    return {"passed": bool(ok and finite), "max_abs_err": worst if finite else float("inf"), "finite": finite}


def fp16_repair(fp32_path: str, out_path: str, samples: list, atol: float, rtol: float,
                opts: dict | None = None, max_iters: int = 6) -> dict:
    """Mixed precision that passes parity: convert, check, grow the fp32 node block list
    with fp16_block_list(), re-convert; stop when parity passes or nothing new is found.

    Returns {"passed", "node_block_list", "history": [{iter, blocked, max_abs_err, passed}]}.
    The final model is at out_path (the last attempt, even when it did not pass)."""
    opts = dict(opts or {})
    block = list(opts.pop("node_block_list", []))
    history = []
    for it in range(max_iters):
        fp16(fp32_path, out_path, {**opts, "node_block_list": block})
        res = parity(fp32_path, out_path, samples, atol, rtol)
        history.append({"iter": it, "blocked": len(block), "max_abs_err": res["max_abs_err"], "passed": res["passed"]})
        if res["passed"]:
            return {"passed": True, "node_block_list": block, "history": history}
        new = fp16_block_list(fp32_path, out_path, samples, atol, rtol, already_blocked=block)
        if not new:
            break
        block += new
    return {"passed": False, "node_block_list": block, "history": history}


def fp16_repair_recipe(in_path: str, out_path: str, opts: dict) -> dict:
    """The repair as a recipe: opts["samples"] (an .npz of save_samples' layout), atol and rtol (the fp16
    tolerance the artifact is held to), max_iters. Facts: the nodes kept in float32 and each iteration."""
    samples = load_samples(opts["samples"])
    result = fp16_repair(in_path, out_path, samples, float(opts["atol"]), float(opts["rtol"]),
                         opts={k: v for k, v in opts.items() if k not in ("samples", "atol", "rtol", "max_iters")},
                         max_iters=int(opts.get("max_iters", 6)))
    return {**result, "nodes_kept_fp32": len(result["node_block_list"]), "lossy": True,
            "load_with": _load_with(opts)}
