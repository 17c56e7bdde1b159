"""Lossless ONNX optimization recipes: onnxruntime's graph optimizer saved offline, onnxslim, and the helpers every
ONNX recipe shares (`transformer` holds the transformer fusions, `precision` the lossy recipes). portq's
optimization variants (`variants`) run them, and each variant's reproduce script carries a copy of this file's
source (and of the other recipe modules its variant lists) and runs them the same way.

Each recipe is a plain function `recipe(in_path, out_path, opts) -> facts` that reads an fp32 ONNX model
written by torch.onnx (external data allowed), writes the optimized model to `out_path` and returns a
small JSON-able dict of facts (node counts, fused operators, ...). Every facts dict carries `load_with`:
how a consumer must open the artifact (graph optimization level, disabled optimizers), since some
choices hold only if the loader honours them. So this module stands alone: the standard library at the
top, onnx/onnxruntime/onnxslim inside functions, never portq; every recipe is deterministic given its
inputs. A recipe that does not apply to the model raises `NotApplicable`.

Measured on 2 shared CPU cores, onnxruntime 1.32 (see the README's optimization section): offline
ORT_ENABLE_ALL files carry NCHWc weights reordered for the host's SIMD width (`hardware_specific`);
ORT's CPU SkipLayerNormalization kernel is 5-8x slower than Add + LayerNormalization, so that fusion is
disabled for CPU targets (`SLOW_CPU_FUSIONS`); files saved offline are loaded with optimizations off.
"""
from __future__ import annotations

import os

FP16_MAX = 65504.0

# ORT graph transformers that make CPU inference *slower* (measured, onnxruntime 1.32,
# AVX-512 host): the CPU SkipLayerNormalization kernel is 5-8x slower than the
# Add + LayerNormalization it replaces (256x128: 170us vs 31us; 512x1024: 2.6ms vs 0.32ms),
# costing 15-25% end to end on BERT-like models. Disabled by default for target "cpu";
# opts["avoid_slow_cpu_fusions"]=False restores ORT's default. Re-measure on upgrades.
SLOW_CPU_FUSIONS = ("SkipLayerNormFusion",)

# Ops that ORT's CPU EP cannot run in fp16 *and* that the converter's default list misses
# would be added here; in onnxruntime 1.32 the CPU EP inserts fp32 casts itself, so none.
_CPU_EXTRA_FP16_BLOCK: list = []


# ============================================================================ helpers
def _load(path: str):
    """Load an ONNX model including external data (torch.onnx writes <name>.data for >2GB)."""
    import onnx

    return onnx.load(path, load_external_data=True)


def _has_external_data(path: str) -> bool:
    """True if any initializer of the model at `path` lives in an external file."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def _weights_bytes(model) -> int:
    """Approximate initializer payload; ModelProto.ByteSize() is unreliable past 2GB."""
    return sum(len(t.raw_data) or 4 * max(len(t.float_data), len(t.int64_data) * 2) for t in model.graph.initializer)


def _save(model, out_path: str, external: bool | None = None) -> bool:
    """Save `model`; external=None: use a single external data file only when needed
    (protobuf's 2GB cap). Variants pass True when their input had external data, so the
    output keeps the input's layout.

    The .data file is deleted first because onnx *appends* to an existing external file."""
    import onnx

    if external is None:
        external = _weights_bytes(model) > 1_800_000_000
    data_name = os.path.basename(out_path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), data_name)
    if os.path.exists(data_path):
        os.remove(data_path)
    if external:
        onnx.save_model(model, out_path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, out_path)
    return bool(external)


def _op_counts(model) -> dict:
    """{op_type (domain-prefixed when not ai.onnx): count} of the main graph."""
    out: dict = {}
    for n in model.graph.node:
        key = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        out[key] = out.get(key, 0) + 1
    return out


def _new_ops(before, after) -> dict:
    """{op_type: count} of the ops in `after` that `before` lacks: the fused operators an optimizer made
    (FusedConv, LayerNormalization, com.microsoft:Attention, ...), by the domain-prefixed names of `_op_counts`."""
    a, b = _op_counts(before), _op_counts(after)
    return {k: n for k, n in sorted(b.items()) if k not in a}


def _fused_ops(model) -> dict:
    """{op_type: count} of onnxruntime's contrib (com.microsoft) operators in the main graph, named as `fused_ops`
    names them (`com.microsoft:Attention`): for a graph whose source graph is not at hand."""
    return {k: n for k, n in sorted(_op_counts(model).items()) if k.startswith("com.microsoft:")}


def _graph_facts(before, after) -> dict:
    """Node counts, the op types whose counts changed (the interesting part of a rewrite) and the fused operators
    (`fused_ops`)."""
    a, b = _op_counts(before), _op_counts(after)
    changed = {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}
    return {"nodes_before": len(before.graph.node), "nodes_after": len(after.graph.node), "ops_changed": changed,
            "fused_ops": _new_ops(before, after)}


def _ensure_node_names(model) -> int:
    """Give unnamed nodes a stable unique name (block lists and nodes_to_exclude match names)."""
    seen = {n.name for n in model.graph.node if n.name}
    fixed = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name, fixed = name, fixed + 1
            seen.add(name)
    return fixed


def _avoid(opts: dict) -> list:
    """Optimizers to disable for this target (see SLOW_CPU_FUSIONS)."""
    cpu = opts.get("target", "cpu") == "cpu" and not opts.get("use_gpu", False)
    return list(SLOW_CPU_FUSIONS) if cpu and opts.get("avoid_slow_cpu_fusions", True) else []


def _load_with(opts: dict, level: str = "ORT_ENABLE_ALL", disabled=()) -> dict:
    """How a consumer must open the artifact: {graph_optimization_level, disabled_optimizers}.

    Part of every variant's facts, because some choices only hold if the loader honours
    them (an ORT-saved graph must not be re-optimized; a graph built without
    SkipLayerNormalization would get it re-fused by ORT's online optimizer)."""
    dis = sorted(set(disabled) | set(opts.get("load_disabled_optimizers", [])) | set(_avoid(opts)))
    return {"graph_optimization_level": level, "disabled_optimizers": dis}


def _session(path_or_bytes, level: str = "ORT_ENABLE_ALL", threads: int = 0, disabled_optimizers=None,
             quiet: bool = False):
    """CPU InferenceSession with an explicit optimization level (by enum name).

    quiet=True silences ORT's own error log for sessions that are expected to fail."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 4 if quiet else 3
    if threads:
        so.intra_op_num_threads = threads
    kw = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"], **kw)


def _dummy_feeds(sess, seed: int = 0) -> dict:
    """Random feeds for a smoke run (float: N(0,1); ints: zeros/ones, valid for ids & masks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dt = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    feeds: dict = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        t = dt.get(i.type, np.float32)
        if np.issubdtype(t, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(t)
        else:
            feeds[i.name] = np.ones(shape, t)
    return feeds


def load_samples(npz_path: str) -> list:
    """Read calibration/parity samples: arrays s<i>_<j> (sample i, input j) + `input_names`."""
    import numpy as np

    z = np.load(npz_path, allow_pickle=False)
    names = [str(x) for x in z["input_names"]]
    n = 1 + max(int(k[1:].split("_")[0]) for k in z.files if k.startswith("s"))
    return [{nm: z[f"s{i}_{j}"] for j, nm in enumerate(names)} for i in range(n)]


def save_samples(npz_path: str, samples: list) -> str:
    """Inverse of load_samples (used by tests/bench to write the calibration file)."""
    import numpy as np

    names = list(samples[0])
    arrays = {f"s{i}_{j}": s[nm] for i, s in enumerate(samples) for j, nm in enumerate(names)}
    np.savez(npz_path, input_names=np.array(names), **arrays)
    return npz_path


def _toposort(graph) -> None:
    """Reorder graph.node topologically in place (the fp16 converter appends its Casts at
    the end; ORT tolerates that, onnx.checker and most other tools do not)."""
    avail = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # cycle or outer-scope inputs (subgraphs): keep as is
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# ====================================================================== ORT offline
def _ort_offline(in_path: str, out_path: str, level: str, opts: dict) -> dict:
    """Let onnxruntime optimize at `level` and serialize the result (offline mode).

    opts: disabled_optimizers (list of ORT transformer names), portable (ort_all only),
    external_data (force side file), load_level (what facts['load_with'] tells the
    loader; default ORT_DISABLE_ALL; ORT_ENABLE_ALL on an ort_extended file = portable
    artifact + host-specific layout transforms done at load), target / avoid_slow_cpu_fusions.

    Why: the saved graph skips optimization time at load and is what portq can inspect
    and hash. Load it with ORT_DISABLE_ALL (see facts): re-optimizing an ORT-saved graph
    is unnecessary and, in ORT 1.32, can fail (MatMulAddFusion "Attempt to replace the
    existing tensor" on re-load of an ORT_ENABLE_BASIC save of a dynamo BERT)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = out_path
    so.log_severity_level = 3
    external = bool(opts.get("external_data", _has_external_data(in_path)))
    data_name = os.path.basename(out_path) + ".data"
    if external:  # >2GB models: ORT must write initializers to a side file itself
        data_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), data_name)
        if os.path.exists(data_path):
            os.remove(data_path)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    disabled = list(opts.get("disabled_optimizers", [])) + _avoid(opts)
    if level == "ORT_ENABLE_ALL" and opts.get("portable", False):
        disabled.append("NchwcTransformer")  # NCHWc weights are reordered for this CPU's SIMD width
    kw = {"disabled_optimizers": disabled} if disabled else {}
    ort.InferenceSession(in_path, so, providers=["CPUExecutionProvider"], **kw)

    before, after = onnx.load(in_path, load_external_data=False), onnx.load(out_path, load_external_data=False)
    facts = _graph_facts(before, after)
    domains = sorted({n.domain for n in after.graph.node if n.domain})
    facts.update({
        "ort_level": level,
        "ort_version": ort.__version__,
        "external_data": external,
        "contrib_domains": domains,
        # Extended+ fusions emit com.microsoft ops that only the EP they were made for runs.
        "ep_specific": level in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL"),
        # NCHWc (com.microsoft.nchwc) ops carry weights reordered for this CPU's block size
        # (16 floats on AVX-512, 8 on AVX2): shapes unchanged, so a wrong host gives silently
        # wrong numbers rather than a load error.
        "hardware_specific": "com.microsoft.nchwc" in domains,
        "disabled_optimizers": disabled,
        "load_with": (_load_with(opts, opts["load_level"]) if "load_level" in opts
                      else {"graph_optimization_level": "ORT_DISABLE_ALL", "disabled_optimizers": []}),
    })
    _session(out_path, "ORT_DISABLE_ALL")  # proves the saved file reloads on this host
    facts["reload_ok"] = True
    return facts


def ort_basic(in_path: str, out_path: str, opts: dict) -> dict:
    """ORT basic level (constant folding, redundant-node removal): EP independent, portable."""
    return _ort_offline(in_path, out_path, opts.get("level", "ORT_ENABLE_BASIC"), opts)


def ort_extended(in_path: str, out_path: str, opts: dict) -> dict:
    """ORT extended level (Conv+act, Gemm+act, LayerNorm/SkipLN/Gelu/Attention fusions).

    Output uses com.microsoft contrib ops for the CPU EP; portable across x86 CPUs."""
    return _ort_offline(in_path, out_path, opts.get("level", "ORT_ENABLE_EXTENDED"), opts)


def ort_all(in_path: str, out_path: str, opts: dict) -> dict:
    """ORT all levels incl. NCHWc layout transforms. Host-specific unless opts['portable']

    (which disables NchwcTransformer so the file is safe to move to another CPU)."""
    return _ort_offline(in_path, out_path, opts.get("level", "ORT_ENABLE_ALL"), opts)


# ========================================================================= onnxslim
def onnxslim(in_path: str, out_path: str, opts: dict) -> dict:
    """onnxslim graph simplification (constant folding, dead/identity removal, fusion of
    Conv+BN, Gemm patterns, shape-op cleanup). EP independent, exact up to fp rounding."""
    import onnxslim as slim

    model = _load(in_path)
    kw = {k: opts[k] for k in ("skip_fusion_patterns", "no_constant_folding", "skip_optimizations") if k in opts}
    out = slim.slim(model, **kw)
    external = _save(out, out_path, _has_external_data(in_path) or None)
    facts = _graph_facts(model, out)
    facts.update({"onnxslim_version": getattr(slim, "__version__", "?"), "external_data": external,
                  "load_with": _load_with(opts)})
    return facts
