"""Self-attention blocks of an exported transformer rewritten into onnxruntime's fused `com.microsoft.Attention`.

onnxruntime's own BERT fusion (`onnxruntime.transformers`) matches the attention of older exporters and models
only: on graphs of current transformers models (sdpa or eager attention, the mask built by its masking utilities)
and of `nn.TransformerEncoder` it finds none. This pass matches what those graphs have in common instead of one
exporter's spelling:

    X -> MatMul(Wq) -> Add(bq)? -> Reshape[B,S,N,H] -> Transpose/Mul(scale) chain -> Q [B,N,S,H]
    X -> MatMul(Wk) -> Add(bk)? -> Reshape[B,S,N,H] -> Transpose/Mul(scale) chain -> K^T [B,N,H,T]
    X -> MatMul(Wv) -> Add(bv)? -> Reshape[B,S,N,H] -> Transpose(0,2,1,3)       -> V [B,N,T,H]
    MatMul(Q, K^T) -> Mul|Div(scale)* -> Add(mask)? -> Softmax(-1) -> Where(IsNaN, 0, .)? -> MatMul(., V)
        -> Reshape[B,N,S,H]? -> Transpose(0,2,1,3) -> Reshape[B,S,N*H]

and replaces it by one Attention(X, [Wq|Wk|Wv], [bq|bk|bv], mask) with the product of the scale constants. A mask
made as Where(keep, 0, large negative) (transformers 5) or (1 - keep) * large negative (transformers 4's eager
attention) becomes Attention's integer `mask_index` (which its int8 form, QAttention, takes too) with that negative
as `mask_filter_value`; any other additive mask is passed as `attention_bias`
(which QAttention does not take: `quantizable` says which nodes int8 may turn into QAttention). Exact up to float
rounding; the caller checks the result against its input on random feeds.

Plain functions over an onnx ModelProto, as the other recipe modules: the standard library at the top, onnx and
numpy inside functions, so a reproduce script can carry a copy.
"""

from __future__ import annotations

from portq.tasks.formats.onnx.optimize import _toposort  # portq-only

#: Where(keep, 0, fill) is a mask when fill is at most this (transformers: finfo.min or -inf; older BERT: -10000)
MASK_FILL_AT_MOST = -1e4
FLOAT_LOWEST = -3.4028234663852886e38  # what a -inf fill becomes as Attention's mask_filter_value
_TO_BSNH = [0, 2, 1, 3]  # [B,S,N,H] <-> [B,N,S,H]


class _Graph:
    """Producers, consumers, constants and (where ONNX shape inference knows them) shapes of a model's graph."""

    def __init__(self, model) -> None:
        import onnx
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:  # Constant nodes too (a graph that was not canonicalised)
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.outputs = {o.name for o in g.output}
        self.shapes: dict = {name: list(a.shape) for name, a in self.consts.items()}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - shapes are a help, not a requirement
            inferred = model
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in t.shape.dim]

    def made_by(self, name: str, op: str, private: bool = True):
        """The node of type `op` that makes `name` (used by nobody else when `private`), else None."""
        n = self.producer.get(name)
        if n is None or n.op_type != op:
            return None
        if private and (len(self.consumers.get(name, [])) != 1 or name in self.outputs):
            return None
        return n

    def scalar(self, name: str) -> float | None:
        a = self.consts.get(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None

    def attr(self, node, name: str, default=None):
        from onnx import helper

        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _strip_scale(g: _Graph, name: str) -> tuple[str, float]:
    """Through Mul/Div by scalar constants: (what they scale, the product of their factors)."""
    scale = 1.0
    while True:
        n = g.made_by(name, "Mul") or g.made_by(name, "Div")
        if n is None:
            return name, scale
        for data, factor in ((0, 1), (1, 0)) if n.op_type == "Mul" else ((0, 1),):
            c = g.scalar(n.input[factor])
            if c is not None and c != 0:
                scale *= c if n.op_type == "Mul" else 1.0 / c
                name = n.input[data]
                break
        else:
            return name, scale


def _heads_tensor(g: _Graph, name: str, layout: list[int]) -> tuple[dict, float] | None:
    """Follow `name` back through Transposes and scalar Muls to Reshape(projection, [B,S,N,H]), checking that the
    transposes take [B,S,N,H] to `layout` (axes of B,S,N,H). Returns ({x, weight, bias, heads, head_size}, scale)."""
    perms: list[list[int]] = []
    scale = 1.0
    while True:
        name, s = _strip_scale(g, name)
        scale *= s
        t = g.made_by(name, "Transpose")
        if t is not None:
            perms.append(list(g.attr(t, "perm", [])))
            name = t.input[0]
            continue
        swapped = _swap_through_3d(g, name)
        if swapped is None:
            break
        perms.append([0, 1, 3, 2])
        name = swapped
    axes = [0, 1, 2, 3]  # what the Reshape makes: B, S, N, H
    for p in reversed(perms):
        if len(p) != 4:
            return None
        axes = [axes[i] for i in p]
    if axes != layout:
        return None
    reshape = g.made_by(name, "Reshape")
    target = g.consts.get(reshape.input[1]) if reshape is not None else None
    if target is None or target.size != 4:
        return None
    proj = _projection(g, reshape.input[0])
    if proj is None:
        return None
    width = proj["weight"].shape[1]
    n, h = int(target[2]), int(target[3])
    heads = n if n > 0 else (width // h if h > 0 else 0)
    if heads <= 0 or width % heads or (h > 0 and heads * h != width):
        return None
    return {**proj, "heads": heads, "head_size": width // heads}, scale


def _swap_through_3d(g: _Graph, name: str) -> str | None:
    """Reshape([a,b,c,d] -> [a*b,c,d]) -> Transpose(0,2,1) -> Reshape(-> [a,b,d,c]), the dynamo exporter's spelling
    of swapping the last two axes of a 4-D tensor (its torch.matmul on 4-D operands): the 4-D tensor, or None.
    Needs every shape known."""
    back = g.made_by(name, "Reshape")
    t = g.made_by(back.input[0], "Transpose") if back is not None else None
    there = g.made_by(t.input[0], "Reshape") if t is not None and list(g.attr(t, "perm", [])) == [0, 2, 1] else None
    if there is None:
        return None
    x, flat, out = g.shapes.get(there.input[0]), g.shapes.get(there.output[0]), g.shapes.get(name)
    if not (x and flat and out and len(x) == len(out) == 4 and len(flat) == 3
            and all(isinstance(d, int) and d > 0 for d in (*x, *flat, *out))):
        return None
    if flat != [x[0] * x[1], x[2], x[3]] or out != [x[0], x[1], x[3], x[2]]:
        return None
    return there.input[0]


def _projection(g: _Graph, name: str) -> dict | None:
    """X @ W (+ b), W [D, D'] and b [D'] constants: {x, weight, bias (None: no bias)}."""
    bias = None
    add = g.made_by(name, "Add")
    if add is not None:
        for mm, b in ((0, 1), (1, 0)):
            c = g.consts.get(add.input[b])
            if c is not None and c.ndim == 1 and g.made_by(add.input[mm], "MatMul") is not None:
                name, bias = add.input[mm], c
                break
        else:
            return None
    mm = g.made_by(name, "MatMul")
    weight = g.consts.get(mm.input[1]) if mm is not None else None
    if weight is None or weight.ndim != 2 or (bias is not None and bias.shape[0] != weight.shape[1]):
        return None
    return {"x": mm.input[0], "weight": weight, "bias": bias}


def _merged_output(g: _Graph, name: str, heads: int, head_size: int) -> str | None:
    """From attention's output [B,N,S,H]: an optional same-shape Reshape, Transpose(0,2,1,3), Reshape to
    [B,S,N*H]; the name the block's output has (what Attention will write)."""
    r = g.consumers.get(name, [])
    if len(r) == 1 and r[0].op_type == "Reshape" and name not in g.outputs:
        target = g.consts.get(r[0].input[1])
        same = g.shapes.get(name) is not None and g.shapes.get(name) == g.shapes.get(r[0].output[0])
        if target is not None and target.size == 4 and (same or (int(target[3]) == head_size
                                                                  and int(target[1]) in (heads, -1))):
            name = r[0].output[0]
    t = g.consumers.get(name, [])
    if len(t) != 1 or t[0].op_type != "Transpose" or list(g.attr(t[0], "perm", [])) != _TO_BSNH or name in g.outputs:
        return None
    name = t[0].output[0]
    r = g.consumers.get(name, [])
    if len(r) != 1 or r[0].op_type != "Reshape" or name in g.outputs:
        return None
    target = g.consts.get(r[0].input[1])
    if target is None or target.size != 3 or int(target[2]) not in (heads * head_size, -1):
        return None
    return r[0].output[0]


def _mask(g: _Graph, bias: str) -> dict:
    """How Attention takes the additive mask `bias` [B,?,S|1,T]: as mask_index when it is made from a keep-mask that
    is the same for every head ([B,1,S|1,T], maybe Expanded over the heads), as Where(keep, 0, very negative) or
    (1 - keep) * very negative (older BERT); else as attention_bias (whose broadcasting Attention checks when it
    runs)."""
    full = g.shapes.get(bias)
    if not full or len(full) != 4:
        return {}
    keep, fill = None, None
    made = g.producer.get(bias)
    if made is not None and made.op_type == "Where" and g.scalar(made.input[1]) == 0.0:
        keep, fill = made.input[0], g.scalar(made.input[2])
    elif made is not None and made.op_type == "Mul":
        for s, c in ((0, 1), (1, 0)):
            sub = g.producer.get(made.input[s])
            if sub is not None and sub.op_type == "Sub" and g.scalar(sub.input[0]) == 1.0:
                keep, fill = sub.input[1], g.scalar(made.input[c])
                break
    if keep is not None and fill is not None and fill <= MASK_FILL_AT_MOST:
        shape = _per_head_mask_shape(g, keep)
        while shape is None and g.producer.get(keep) is not None and g.producer[keep].op_type == "Expand":
            keep = g.producer[keep].input[0]
            shape = _per_head_mask_shape(g, keep)
        if shape and None not in (full[0], full[3]) and shape[0] == full[0] and shape[3] == full[3] \
                and (shape[2] == 1 or (full[2] is not None and shape[2] == full[2])):
            return {"keep": keep, "squeeze": [1, 2] if shape[2] == 1 else [1],
                    "fill": fill if fill > float("-inf") else FLOAT_LOWEST}
    if full[2] == 1:  # Attention's attention_bias does not broadcast over S
        return {}
    return {"attention_bias": bias}


def _per_head_mask_shape(g: _Graph, name: str) -> list | None:
    shape = g.shapes.get(name)
    return shape if shape and len(shape) == 4 and shape[1] == 1 else None


def _match(g: _Graph, sm) -> dict | None:
    """The self-attention block around Softmax `sm`, or None."""
    if g.attr(sm, "axis", -1) not in (-1, 3):
        return None
    probs = sm.output[0]
    users = g.consumers.get(probs, [])
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:  # sdpa's guard of all-masked rows
        isnan = next(u for u in users if u.op_type == "IsNaN")
        guard = next(u for u in users if u.op_type == "Where")
        if list(guard.input) != [isnan.output[0], guard.input[1], probs] or g.scalar(guard.input[1]) != 0.0:
            return None
        probs, users = guard.output[0], g.consumers.get(guard.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs or probs in g.outputs:
        return None
    pv = users[0]
    scores, bias = sm.input[0], None
    add = g.made_by(scores, "Add")
    if add is not None:
        for s, b in ((0, 1), (1, 0)):
            if g.made_by(_strip_scale(g, add.input[s])[0], "MatMul") is not None:
                scores, bias = add.input[s], add.input[b]
                break
        else:
            return None
    scores, scale = _strip_scale(g, scores)
    qk = g.made_by(scores, "MatMul")
    if qk is None:
        return None
    found = [_heads_tensor(g, qk.input[0], [0, 2, 1, 3]), _heads_tensor(g, qk.input[1], [0, 2, 3, 1]),
             _heads_tensor(g, pv.input[1], [0, 2, 1, 3])]
    seq_first = any(f is None for f in found)
    if seq_first:  # nn.MultiheadAttention as the dynamo exporter writes it
        found = [_packed_heads(g, qk.input[0], (1, 0, 2)), _packed_heads(g, qk.input[1], (1, 2, 0)),
                 _packed_heads(g, pv.input[1], (1, 0, 2))]
        if any(f is None for f in found) or [f[0]["index"] for f in found] != [0, 1, 2]:  # type: ignore[index]
            return None
    (q, sq), (k, sk), (v, sv) = found  # type: ignore[misc]
    if sv != 1.0 or not (q["x"] == k["x"] == v["x"]) \
            or len({(p["heads"], p["head_size"], p["weight"].shape) for p in (q, k, v)}) != 1:
        return None
    out = (_seq_first_output(g, pv.output[0]) if seq_first
           else _merged_output(g, pv.output[0], q["heads"], q["head_size"]))
    if out is None:
        return None
    mask = _mask(g, bias) if bias is not None else {}
    if bias is not None and not mask:
        return None
    return {"x": q["x"], "q": q, "k": k, "v": v, "scale": scale * sq * sk, "out": out, "mask": mask,
            "seq_first": seq_first}


def _packed_heads(g: _Graph, name: str, order: tuple[int, ...]) -> tuple[dict, float] | None:
    """torch's multi_head_attention_forward as dynamo exports it (static shapes only): x [B,S,D] -> Transpose(1,0,2)
    -> MatMul(W [D,3D]) + b -> Reshape[S,B,3,D] -> Unsqueeze(0) -> Transpose(3,1,2,0,4) -> Squeeze(-2) ->
    Gather(i, axis 0) -> Reshape[S,B*N,H] -> 3-D transposes to `order` (of S, B*N, H) -> Reshape[B,N,.,.]; then
    scalar scales. Returns ({x, weight, bias: the i-th third, heads, head_size, index: i}, scale)."""
    import numpy as np

    name, scale = _strip_scale(g, name)
    split = g.made_by(name, "Reshape")
    if split is None:
        return None
    name, perms = split.input[0], []
    while (t := g.made_by(name, "Transpose")) is not None:
        perms.append(list(g.attr(t, "perm", [])))
        name = t.input[0]
    axes = [0, 1, 2]
    for p in reversed(perms):
        if len(p) != 3:
            return None
        axes = [axes[i] for i in p]
    heads3 = g.made_by(name, "Reshape")
    gather = g.made_by(heads3.input[0], "Gather") if heads3 is not None and tuple(axes) == order else None
    if gather is None or g.attr(gather, "axis", 0) != 0 or g.scalar(gather.input[1]) not in (0.0, 1.0, 2.0):
        return None
    squeeze = g.made_by(gather.input[0], "Squeeze", private=False)
    t5 = g.made_by(squeeze.input[0], "Transpose") if squeeze is not None and len(squeeze.input) > 1 else None
    unsq = g.made_by(t5.input[0], "Unsqueeze") if t5 is not None and list(g.attr(t5, "perm", [])) == [3, 1, 2, 0, 4] \
        else None
    packed = g.made_by(unsq.input[0], "Reshape") if unsq is not None else None
    proj = _projection(g, packed.input[0]) if packed is not None else None
    xt = g.made_by(proj["x"], "Transpose") if proj is not None else None
    if xt is None or list(g.attr(xt, "perm", [])) != [1, 0, 2] or proj["bias"] is None:
        return None
    sbd, s3d, flat, four, x = (g.shapes.get(n) for n in (packed.output[0], squeeze.output[0], heads3.output[0],
                                                           split.output[0], xt.input[0]))
    sizes = (sbd, s3d, flat, four, x)
    if not all(v and all(isinstance(d, int) and d > 0 for d in v) for v in sizes):
        return None
    d = proj["weight"].shape[1] // 3
    seq, batch = sbd[0], sbd[1]
    heads, size = four[1], four[3] if order == (1, 0, 2) else four[2]
    if (list(np.asarray(g.consts.get(squeeze.input[1], [])).reshape(-1)) not in ([-2], [3])
            or g.scalar(unsq.input[1]) != 0.0 or sbd != [seq, batch, 3, d] or s3d != [3, seq, batch, d]
            or x != [batch, seq, d] or flat != [seq, batch * heads, size] or heads * size != d or four[0] != batch):
        return None
    i = int(g.scalar(gather.input[1]))  # type: ignore[arg-type]
    cols = slice(i * d, (i + 1) * d)
    return {"x": xt.input[0], "weight": proj["weight"][:, cols], "bias": proj["bias"][cols], "heads": heads,
            "head_size": size, "index": i}, scale


def _seq_first_output(g: _Graph, name: str) -> tuple[str, int] | None:
    """[B,N,S,H] -> Transpose(2,0,1,3) -> Reshape[S*B, D] (the output projection's input): (that Reshape's name,
    its data input's position), to be fed the Attention output made sequence-first."""
    t = g.consumers.get(name, [])
    if len(t) != 1 or t[0].op_type != "Transpose" or list(g.attr(t[0], "perm", [])) != [2, 0, 1, 3]:
        return None
    r = g.consumers.get(t[0].output[0], [])
    target = g.consts.get(r[0].input[1]) if len(r) == 1 and r[0].op_type == "Reshape" else None
    if target is None or target.size != 2 or t[0].output[0] in g.outputs or not r[0].name:
        return None
    return r[0].name, 0


def fuse_attention(model) -> dict:
    """Rewrite every matched self-attention block of `model` (in place) into com.microsoft.Attention.

    Returns {"attention": fused blocks, "attention_bias": of those, how many kept a float mask}."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = _Graph(model)
    graph = model.graph
    added, masks, fused, with_bias = [], {}, 0, 0
    for sm in [n for n in graph.node if n.op_type == "Softmax"]:
        m = _match(g, sm)
        if m is None:
            continue
        tag = f"portq_attention_{fused}"
        q, k, v = m["q"], m["k"], m["v"]
        weight = np.concatenate([q["weight"], k["weight"], v["weight"]], axis=1).astype(q["weight"].dtype)
        zeros = np.zeros(q["weight"].shape[1], q["weight"].dtype)
        bias = np.concatenate([p["bias"] if p["bias"] is not None else zeros for p in (q, k, v)]).astype(weight.dtype)
        graph.initializer.extend([numpy_helper.from_array(weight, f"{tag}_qkv_weight"),
                                  numpy_helper.from_array(bias, f"{tag}_qkv_bias")])
        inputs = [m["x"], f"{tag}_qkv_weight", f"{tag}_qkv_bias"]
        attrs = {"num_heads": q["heads"], "scale": float(m["scale"])}
        mask = m["mask"]
        if "keep" in mask:  # one int32 mask_index per keep-mask, shared by the layers that use it
            key = (mask["keep"], tuple(mask["squeeze"]))
            if key not in masks:
                axes = f"{tag}_mask_axes"
                graph.initializer.append(numpy_helper.from_array(np.array(mask["squeeze"], "int64"), axes))
                masks[key] = f"{tag}_mask_index"
                added += [helper.make_node("Squeeze", [mask["keep"], axes], [f"{tag}_mask_2d"], name=f"{tag}_sq"),
                          helper.make_node("Cast", [f"{tag}_mask_2d"], [masks[key]], to=6, name=f"{tag}_cast")]
            inputs.append(masks[key])
            attrs["mask_filter_value"] = float(mask["fill"])
        elif "attention_bias" in mask:
            inputs += ["", "", mask["attention_bias"]]
            with_bias += 1
        if m["seq_first"]:  # the output projection reads [S*B, D]: feed it the Attention output, sequence first
            reshape = next(n for n in graph.node if n.name == m["out"][0])
            added += [helper.make_node("Attention", inputs, [f"{tag}_bsd"], domain="com.microsoft", name=tag,
                                       **attrs),
                      helper.make_node("Transpose", [f"{tag}_bsd"], [f"{tag}_sbd"], perm=[1, 0, 2], name=f"{tag}_t")]
            reshape.input[m["out"][1]] = f"{tag}_sbd"
        else:
            added.append(helper.make_node("Attention", inputs, [m["out"]], domain="com.microsoft", name=tag, **attrs))
            # the old block's last node no longer writes the output: renamed, it is left dead and swept below
            old = g.producer[m["out"]]
            old.output[0] = f"{tag}_replaced"
        fused += 1
    if fused:
        graph.node.extend(added)
        _toposort(graph)
        _sweep(graph)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"attention": fused, "attention_bias": with_bias}


def _sweep(graph) -> None:
    """Drop nodes whose outputs nothing reads, and initializers no node reads (nodes in topological order)."""
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output if o):
            kept.append(n)
            needed.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = needed | {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
