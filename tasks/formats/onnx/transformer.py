"""onnxruntime's transformer fusions (Attention, LayerNorm, SkipLayerNorm, Gelu; Optimum's O2) as a plain ONNX
recipe, with the graph canonicalisation that makes them fire on dynamo exports and an experimental fusion of
decomposed scaled-dot-product attention. Plain functions, as in `optimize` (whose helpers it uses); the
`ort-transformer` variant's reproduce script carries a copy of both.
"""

from __future__ import annotations

import os
import tempfile

from portq.tasks.formats.onnx.attention import fuse_attention  # portq-only
from portq.tasks.formats.onnx.optimize import (  # portq-only
    _avoid,
    _dummy_feeds,
    _graph_facts,
    _has_external_data,
    _load,
    _load_with,
    _op_counts,
    _save,
    _session,
    _toposort,
)
from portq.tasks.formats.recipes import NotApplicable  # portq-only


# ================================================================ transformer fusions
def transformer_profile(model) -> dict:
    """Cheap structural test for "transformer-like": normalisation + softmax attention.

    Counts LayerNormalization (or the decomposed ReduceMean/Sub/Pow/Sqrt form older
    exporters emit), Softmax, and MatMuls whose *both* operands are activations (QK^T and
    attn@V). transformer_like = softmax>=1 and activation-matmuls>=2 and some layernorm."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = _op_counts(model)
    act_mm = sum(1 for n in model.graph.node if n.op_type == "MatMul"
                 and not any(i in inits or i in consts for i in n.input))
    ln = ops.get("LayerNormalization", 0) + ops.get("com.microsoft:SkipLayerNormalization", 0)
    decomposed_ln = min(ops.get("ReduceMean", 0) // 2, ops.get("Sqrt", 0))
    gelu = ops.get("Erf", 0) + ops.get("Tanh", 0)
    heads = _guess_heads(model)
    return {
        "layernorm": ln, "decomposed_layernorm": decomposed_ln, "softmax": ops.get("Softmax", 0),
        "activation_matmuls": act_mm, "gelu_like": gelu, "guessed_num_heads": heads,
        "transformer_like": ops.get("Softmax", 0) >= 1 and act_mm >= 2 and (ln + decomposed_ln) >= 1,
    }


def _guess_heads(model) -> int:
    """num_heads from the first 4-D Reshape target [B, S, H, Dh] feeding a Transpose(0,2,1,3).

    Informational only: passing num_heads=0/hidden_size=0 lets ORT read them from the
    same Reshape constants during attention fusion, which is what we do."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in inits:
            shape = numpy_helper.to_array(inits[n.input[1]]).tolist()
            perm_ok = any(c.op_type == "Transpose"
                          and [a.ints for a in c.attribute if a.name == "perm"] == [[0, 2, 1, 3]]
                          for c in consumers.get(n.output[0], []))
            if len(shape) == 4 and perm_ok and shape[2] > 0:
                return int(shape[2])
    return 0


def _canonicalize_for_fusion(model) -> dict:
    """Rewrite dynamo-exporter idioms into the shapes ORT's Python fusions pattern-match.

    1. Constant nodes -> initializers (TorchScript exports; fusions look up initializers).
    2. Unsqueeze with several constant axes -> chain of single-axis Unsqueezes. The dynamo
       exporter emits `mask[:, None, None, :]` as one Unsqueeze(axes=[1,2]); the BERT
       attention fusion only accepts the Unsqueeze->Unsqueeze mask path and otherwise
       silently skips Attention fusion ("failed to match mask path")."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    stats = {"constants_to_initializers": 0, "unsqueeze_split": 0}
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            stats["constants_to_initializers"] += 1
        else:
            keep.append(n)
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    for n in keep:
        if n.op_type == "Unsqueeze" and len(n.input) == 2 and n.input[1] in inits:
            axes = numpy_helper.to_array(inits[n.input[1]]).astype("int64").tolist()
            if len(axes) > 1 and all(a >= 0 for a in axes):
                cur = n.input[0]
                for k, a in enumerate(sorted(axes)):
                    ax_name = f"{n.name or n.output[0]}_axis{k}"
                    g.initializer.append(numpy_helper.from_array(np.array([a], "int64"), ax_name))
                    out = n.output[0] if k == len(axes) - 1 else f"{n.output[0]}_u{k}"
                    new_nodes.append(helper.make_node("Unsqueeze", [cur, ax_name], [out], name=f"{n.name}_{k}"))
                    cur = out
                stats["unsqueeze_split"] += 1
                continue
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return stats


def _scalar_const(name: str, inits: dict):
    """Float value of a scalar (or 1-element) initializer, else None."""
    from onnx import numpy_helper

    if name not in inits:
        return None
    a = numpy_helper.to_array(inits[name])
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _fuse_sdpa_to_mha(model) -> int:
    """Rewrite decomposed scaled-dot-product attention into com.microsoft.MultiHeadAttention.

    Targets what ORT's BERT Attention fusion cannot match, e.g. nn.MultiheadAttention /
    F.scaled_dot_product_attention exported by dynamo at opset 18:
        MatMul(Mul?(q4, c1), Mul?(kT4, c2)) -> (Mul|Div c3)? -> (Add bias4)? -> Softmax(-1) -> MatMul(., v4)
    with q4 [B,N,S,H], kT4 [B,N,H,L], v4 [B,N,L,H] (static shapes from ONNX shape inference).
    Replacement: q4 -> Transpose(0,2,1,3) -> Reshape[0,0,N*H] as BSD query, K/V passed
    in BNSH (MHA's "pre-projected" cross-attention form, supported by the CPU kernel),
    scale = c1*c2*c3, additive mask -> attention_bias, output reshaped back to [B,N,S,H].
    Returns the number of fused attentions. Experimental: see FINDINGS.md for the effect."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return 0
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def single(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op and len(consumers.get(name, [])) == 1 else None

    def strip_scale(name):
        n = producer.get(name)
        if n is not None and n.op_type == "Mul" and len(consumers.get(name, [])) == 1:
            for a, b in ((0, 1), (1, 0)):
                c = _scalar_const(n.input[b], inits)
                if c is not None:
                    return n.input[a], c, [n]
        return name, 1.0, []

    removed: set = set()
    added: list = []
    fused = 0
    for sm in list(g.node):
        if sm.op_type != "Softmax" or any(a.name == "axis" and a.i not in (-1, 3) for a in sm.attribute):
            continue
        pv = consumers.get(sm.output[0], [])
        if len(pv) != 1 or pv[0].op_type != "MatMul" or pv[0].input[0] != sm.output[0]:
            continue
        pv = pv[0]
        cur, dead, scale, bias = sm.input[0], [sm, pv], 1.0, None
        add = single(cur, "Add")
        if add is not None:
            for a, b in ((0, 1), (1, 0)):
                made_by = producer.get(add.input[a])
                if made_by is not None and made_by.op_type in ("MatMul", "Mul", "Div"):
                    cur, bias = add.input[a], add.input[b]
                    dead.append(add)
                    break
            else:
                continue
        for op in ("Mul", "Div"):
            n = single(cur, op)
            c = _scalar_const(n.input[1], inits) if n is not None else None
            if c:
                scale *= c if op == "Mul" else 1.0 / c
                cur = n.input[0]
                dead.append(n)
                break
        qk = single(cur, "MatMul")
        if qk is None:
            continue
        dead.append(qk)
        q4, c1, d1 = strip_scale(qk.input[0])
        kt4, c2, d2 = strip_scale(qk.input[1])
        v4 = pv.input[1]
        sq, sk, sv = shapes.get(q4, []), shapes.get(kt4, []), shapes.get(v4, [])
        if not (len(sq) == len(sk) == len(sv) == 4 and all(sq) and all(sk) and all(sv)):
            continue
        b, heads, s, h = sq
        if sk[2] != h or sv[3] != h or sv[1] != heads or sk[1] != heads:
            continue
        if bias is not None:
            sb = shapes.get(bias, [])
            if len(sb) != 4 or sb[2:] != [s, sk[3]] or sb[1] not in (1, heads):
                continue
        dead += d1 + d2
        scale *= c1 * c2
        tag = f"sdpa_mha_{fused}"
        shp_q = numpy_helper.from_array(np.array([0, 0, heads * h], "int64"), f"{tag}_shape_q")
        shp_o = numpy_helper.from_array(np.array([0, 0, heads, h], "int64"), f"{tag}_shape_o")
        g.initializer.extend([shp_q, shp_o])
        added += [
            helper.make_node("Transpose", [q4], [f"{tag}_q_bsnh"], perm=[0, 2, 1, 3], name=f"{tag}_tq"),
            helper.make_node("Reshape", [f"{tag}_q_bsnh", shp_q.name], [f"{tag}_q"], name=f"{tag}_rq"),
            helper.make_node("Transpose", [kt4], [f"{tag}_k"], perm=[0, 1, 3, 2], name=f"{tag}_tk"),
            helper.make_node("MultiHeadAttention", [f"{tag}_q", f"{tag}_k", v4, "", "", bias or ""],
                             [f"{tag}_o"], domain="com.microsoft", num_heads=heads, scale=scale, name=tag),
            helper.make_node("Reshape", [f"{tag}_o", shp_o.name], [f"{tag}_o_bsnh"], name=f"{tag}_ro"),
            helper.make_node("Transpose", [f"{tag}_o_bsnh"], [pv.output[0]], perm=[0, 2, 1, 3], name=f"{tag}_to"),
        ]
        removed.update(id(n) for n in dead)
        fused += 1
    if fused:
        keep = [n for n in g.node if id(n) not in removed] + added
        del g.node[:]
        g.node.extend(keep)
        _toposort(g)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def ort_transformer(in_path: str, out_path: str, opts: dict) -> dict:
    """onnxruntime.transformers fusions (Attention, LayerNorm, SkipLayerNorm, (Bias)Gelu),
    i.e. Optimum's O2 (O3 = opts['gelu_approximation']=True -> FastGelu, slightly lossy).

    Steps: _canonicalize_for_fusion -> transformer_like check -> attention.fuse_attention
    (self-attention blocks -> com.microsoft.Attention; ORT's own Attention fusion matches
    none of current transformers' or nn.TransformerEncoder's exports) -> optimize_model
    (model_type, num_heads=0, hidden_size=0: inferred from the q/k/v Reshape constants) for
    each candidate opt_level (SkipLayerNorm, Gelu, any Attention left to ORT) -> optional
    _fuse_sdpa_to_mha -> keep the smallest candidate that loads under ORT_ENABLE_ALL and
    matches the input model on random feeds; when none with the rewrite does, the same
    without it (facts['attention_rewrite']['fell_back']).

    opts: model_type ('bert' covers BERT/RoBERTa/ViT-style encoders; 'gpt2' decoders),
    num_heads / hidden_size, opt_level (default: try 0 and 1; 2+ disables Attention fusion
    on these graphs because ORT's own MatMul/Transpose fusions run first), use_gpu,
    force (skip the transformer_like check), attention_rewrite (default True),
    embed_layer_norm (default False, as Optimum:
    EmbedLayerNormalization breaks int8 quantization), skip_layer_norm (default: False for
    target cpu, see SLOW_CPU_FUSIONS; False keeps Add+LayerNormalization and tells the
    loader to disable SkipLayerNormFusion), target ('cpu'|'cuda'),
    sdpa_fusion (default False; True adds
    a _fuse_sdpa_to_mha candidate, 'only' forces it)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions

    model = _load(in_path)
    canon = _canonicalize_for_fusion(model) if opts.get("canonicalize", True) else {}
    prof = transformer_profile(model)
    if not prof["transformer_like"] and not opts.get("force", False):
        found = ", ".join(f"{k} {v}" for k, v in prof.items() if k in ("softmax", "activation_matmuls", "layernorm"))
        raise NotApplicable(f"not transformer-like (needs softmax attention and layer normalization; found {found})")
    model_type = opts.get("model_type", "bert")
    fo = FusionOptions(model_type)
    fo.enable_embed_layer_norm = bool(opts.get("embed_layer_norm", False))
    fo.enable_gelu_approximation = bool(opts.get("gelu_approximation", False))
    keep_skip_ln = bool(opts.get("skip_layer_norm", "SkipLayerNormFusion" not in _avoid(opts)))
    fo.enable_skip_layer_norm = fo.enable_bias_skip_layer_norm = keep_skip_ln
    levels = [int(opts["opt_level"])] if "opt_level" in opts else [0, 1]
    tol = 1e-2 if fo.enable_gelu_approximation else 1e-3
    tried, best, rewritten = [], None, {}
    with tempfile.TemporaryDirectory() as td:
        plain = os.path.join(td, "canon.onnx")
        external = _save(model, plain, _has_external_data(in_path) or None)
        srcs = {"plain": plain}
        if opts.get("attention_rewrite", True):
            # before ORT's fusions, which match only older exports' attention (and, once they fused LayerNorms,
            # hide the shapes this one reads). Re-load: an external-data save pointed the proto at canon's file.
            model = _load(plain)
            rewritten = fuse_attention(model)
            if rewritten["attention"]:
                srcs = {"attention": os.path.join(td, "canon_attention.onnx")}
                _save(model, srcs["attention"], external or None)
        if opts.get("sdpa_fusion", False):
            # before optimize_model: afterwards contrib ops hide the shapes it needs.
            model = _load(plain)
            n_mha = _fuse_sdpa_to_mha(model)
            if n_mha:
                srcs["sdpa"] = os.path.join(td, "canon_sdpa.onnx")
                _save(model, srcs["sdpa"], external or None)
                if opts["sdpa_fusion"] == "only":
                    srcs.pop("plain", None)
        for kind, src in srcs.items():
            best = _try_levels(kind, src, in_path, td, levels, opts, fo, tol, external, tried, best)
        if best is None and "attention" in srcs:  # the rewrite did not match its input: ORT's fusions alone
            rewritten["fell_back"] = True
            best = _try_levels("plain", plain, in_path, td, levels, opts, fo, tol, external, tried, best)
        if best is None:  # the optimizer's limit on this graph, not a fault of the model: skipped, with why
            why = "; ".join(f"{t['source']} at opt level {t['opt_level']}: "
                            + (str(t.get("error") or "outputs differ").strip().splitlines() or [""])[0][:160]
                            for t in tried)
            raise NotApplicable(f"onnxruntime's transformer optimizer made no graph that loads and matches the "
                                f"model ({why})")
        # re-load: saving with external data rewrites the proto's tensors to point at cand's file
        _save(_load(best[3]), out_path, external or None)
    after = onnx.load(out_path, load_external_data=False)
    facts = _graph_facts(onnx.load(in_path, load_external_data=False), after)
    heads = sorted({a.i for n in after.graph.node if n.op_type in ("Attention", "MultiHeadAttention")
                    for a in n.attribute if a.name == "num_heads"})
    facts.update({"profile": prof, "canonicalize": canon, "attention_rewrite": rewritten, "fused": best[2],
                  "opt_level": best[0],
                  "candidates": tried, "model_type": model_type, "attention_num_heads": heads,
                  "lossy": fo.enable_gelu_approximation,
                  "load_with": _load_with(opts, disabled=() if keep_skip_ln else ("SkipLayerNormFusion",))})
    if keep_skip_ln:
        facts["load_with"]["disabled_optimizers"] = [d for d in facts["load_with"]["disabled_optimizers"]
                                                     if d != "SkipLayerNormFusion"]
    return facts


def _try_levels(kind: str, src: str, in_path: str, td: str, levels: list, opts: dict, fo, tol: float,
                external: bool, tried: list, best):
    """optimize_model on `src` at each level; each candidate checked against the input, the smallest that passes
    kept: best = (level, nodes, fused, path)."""
    from onnxruntime.transformers.optimizer import optimize_model

    for lvl in levels:
        opt = optimize_model(src, model_type=opts.get("model_type", "bert"), num_heads=int(opts.get("num_heads", 0)),
                             hidden_size=int(opts.get("hidden_size", 0)), optimization_options=fo,
                             opt_level=lvl, use_gpu=bool(opts.get("use_gpu", False)))
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        cand = os.path.join(td, f"cand_{kind}{lvl}.onnx")
        _save(opt.model, cand, external or None)
        check = _check_equivalent(in_path, cand, tol)
        n = len(opt.model.graph.node)
        tried.append({"source": kind, "opt_level": lvl, "nodes": n, "fused": fused, **check})
        if check["ok"] and (best is None or n < best[1]):
            best = (lvl, n, fused, cand)
    return best


def _check_equivalent(ref_path: str, test_path: str, tol: float) -> dict:
    """Load `test_path` under ORT_ENABLE_ALL (what a consumer does) and compare with the
    reference on two random feeds, the second with a padded row (a fused attention that
    ignored its mask would pass on all-ones masks); guards against fusions that load but
    compute wrong."""
    import numpy as np

    try:
        a, b = _session(ref_path, "ORT_DISABLE_ALL"), _session(test_path, "ORT_ENABLE_ALL", quiet=True)
        err = 0.0
        for seed in (0, 1):
            feeds = _dummy_feeds(a, seed)
            if seed:  # a padded row: zeros in the second half of the last row of integer inputs (ids, masks)
                for x in feeds.values():
                    if x.dtype.kind in "iub" and x.ndim == 2 and x.shape[1] > 1:
                        x[-1, x.shape[1] // 2:] = 0
            for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
                scale = max(1.0, float(np.abs(x).max()))
                err = max(err, float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max()) / scale)
        return {"ok": err <= tol, "rel_err": err}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": str(e)[:200]}
