"""ONNX symbolic functions for the TorchScript-based exporter (torch.onnx.export(dynamo=False)) for ops it lacks.

  aten::diff                 Slice + Sub (n times), prepend/append by Concat
  aten::fft_rfft             DFT (onesided) on the real signal unsqueezed to (..., 1)
  aten::fft_fft / fft_ifft   DFT / inverse DFT on a complex input in (..., 2) form
  aten::fft_irfft            the Hermitian spectrum rebuilt (Slice, reversed Slice, conj), inverse DFT, real part
  aten::view_as_real         identity (a complex tensor already is (..., 2) in ONNX)
  aten::view_as_complex      identity
  aten::unfold               Gather with a (windows, size) index grid: works for dynamic lengths (the built-in
                             symbolic needs the input's size at export time, which archives loaded from disk lack)
  aten::cumsum               torch's type promotion first (a cumsum of bools is int64), which the built-in skips
  aten::repeat               Tile with its repeats made a 1-D int64 tensor (the built-in passes on a count computed
                             in floats, `math.ceil(length / chunk)` in a scripted module: a Concat of mixed types, or
                             a Tile onnxruntime refuses, "'Repeats' input must be 1D tensor of type int64")
  aten::histc                one-hot bin membership summed (MoE routers count tokens per expert with it): bin =
                             floor((x - min) * bins / (max - min)), the top edge in the last bin, outside values and
                             NaN not counted; min == max takes the data's range, as torch does

The FFT symbolics follow the convention that a complex tensor is represented as a real tensor with a trailing dim
of 2 (ONNX DFT's own layout). That holds for graphs that went through `script_complex.lower_complex`, which rewrites
all complex arithmetic into real ops and leaves FFTs as `view_as_real(fft_*(view_as_complex(x)))` islands: the
input of fft_fft/fft_ifft/fft_irfft there is always complex, and the input of fft_rfft always real. Use the
symbolics with that pass (`torchscript_symbolics()` is a context manager that registers them around one export and
removes them after, so the process's global exporter registry is left as it was).

Normalization follows torch.fft: norm=None/"backward" scales the inverse by 1/n (ONNX's inverse DFT already does),
"ortho" both ways by 1/sqrt(n), "forward" the forward by 1/n. DFT needs opset >= 17 (opset 20 moved DFT's axis from
an attribute to an input; both are emitted).

Plain torch only (no portq imports): the reproduce scripts of the TorchScript routes carry a copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def _helper() -> Any:
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper
    except ImportError:  # older layouts
        from torch.onnx import symbolic_helper  # type: ignore[no-redef]
    return symbolic_helper


def _c(g: Any, values: Any, dtype: Any = None) -> Any:
    import torch

    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype or torch.int64))


def _const_arg(v: Any, kind: str) -> Any:
    """A python value for a constant input (kind 'i', 's', 'b'), None for None; raises if not constant."""
    h = _helper()
    if h._is_none(v):
        return None
    got = h._maybe_get_const(v, kind)
    if h._is_value(got):
        raise ValueError(f"expected a constant ({kind}) argument")
    return got


def _maybe_int(v: Any) -> Any:
    """An int for a constant, the value itself (a 0-d/1-d int64 tensor) when computed at run time, None for None."""
    h = _helper()
    if h._is_none(v):
        return None
    got = h._maybe_get_const(v, "i")
    return got


def _as_1d(g: Any, v: Any) -> Any:
    """A [k] int64 tensor for a python int or a 0-d/1-d ONNX value."""
    if isinstance(v, int):
        return _c(g, [v])
    return g.op("Reshape", g.op("Cast", v, to_i=7), _c(g, [1]))  # 7 = INT64


def _rank(v: Any, what: str) -> int:
    r = _helper()._get_tensor_rank(v)
    if r is None:
        raise ValueError(f"{what}: the input's rank is unknown (export script_complex.typed_function of the archive)")
    return r


def _dim_len(g: Any, x: Any, axis: int) -> Any:
    """Size of `axis` as a [1] int64 tensor."""
    return g.op("Slice", g.op("Shape", x), _c(g, [axis]), _c(g, [axis + 1]))


def _dft(g: Any, x: Any, axis: int, inverse: bool, onesided: bool) -> Any:
    if g.opset < 17:
        raise ValueError(f"FFT needs ONNX DFT, available from opset 17 (exporting at opset {g.opset})")
    if g.opset >= 20:  # DFT-20: dft_length and axis are inputs
        length = g.op("Squeeze", _dim_len(g, x, axis), _c(g, [0]))
        return g.op("DFT", x, length, _c(g, axis), inverse_i=int(inverse), onesided_i=int(onesided))
    return g.op("DFT", x, axis_i=axis, inverse_i=int(inverse), onesided_i=int(onesided))


def _normalize(g: Any, x: Any, n: Any, norm: str | None, inverse: bool) -> Any:
    """torch.fft scaling on top of ONNX's (forward: none, inverse: 1/n). `n` is a [1] int64 signal length."""
    norm = norm or "backward"
    nf = g.op("Cast", n, to_i=1)  # FLOAT
    nf = g.op("CastLike", nf, x)
    if norm == "ortho":
        s = g.op("Sqrt", nf)
        return g.op("Mul" if inverse else "Div", x, s)
    if norm == "forward":
        return g.op("Mul", x, nf) if inverse else g.op("Div", x, nf)
    return x  # backward: forward unscaled, inverse 1/n (ONNX already)


def _resize(g: Any, x: Any, axis: int, rank: int, n: Any) -> Any:
    """torch.fft's n: trim or zero-pad `axis` of x to length n (n: python int or [1] tensor)."""
    n1 = _as_1d(g, n)
    x = g.op("Slice", x, _c(g, [0]), n1, _c(g, [axis]))
    missing = g.op("Max", g.op("Sub", n1, _dim_len(g, x, axis)), _c(g, [0]))
    zeros_before = _c(g, [0] * rank)
    after = [_c(g, [0])] * rank
    after[axis] = missing
    pads = g.op("Concat", zeros_before, *after, axis_i=0)
    return g.op("Pad", x, pads, mode_s="constant")


# ---------------------------------------------------------------------------------------------- symbolics

def fft_rfft(g: Any, self: Any, n: Any, dim: Any, norm: Any) -> Any:
    rank = _rank(self, "fft_rfft")
    axis = _const_arg(dim, "i") % rank
    n = _maybe_int(n)
    x = self if n is None else _resize(g, self, axis, rank, n)
    x = g.op("Unsqueeze", x, _c(g, [-1]))
    length = _dim_len(g, x, axis)
    return _normalize(g, _dft(g, x, axis, False, True), length, _const_arg(norm, "s"), False)


def _c2c(g: Any, self: Any, n: Any, dim: Any, norm: Any, inverse: bool) -> Any:
    rank = _rank(self, "fft_fft") - 1  # the complex tensor's rank
    axis = _const_arg(dim, "i") % rank
    n = _maybe_int(n)
    x = self if n is None else _resize(g, self, axis, rank + 1, n)
    length = _dim_len(g, x, axis)
    return _normalize(g, _dft(g, x, axis, inverse, False), length, _const_arg(norm, "s"), inverse)


def fft_fft(g: Any, self: Any, n: Any, dim: Any, norm: Any) -> Any:
    return _c2c(g, self, n, dim, norm, False)


def fft_ifft(g: Any, self: Any, n: Any, dim: Any, norm: Any) -> Any:
    return _c2c(g, self, n, dim, norm, True)


def fft_irfft(g: Any, self: Any, n: Any, dim: Any, norm: Any) -> Any:
    rank = _rank(self, "fft_irfft") - 1
    axis = _const_arg(dim, "i") % rank
    n = _maybe_int(n)
    m = _dim_len(g, self, axis)  # bins given
    if n is None:
        n_out = g.op("Mul", g.op("Sub", m, _c(g, [1])), _c(g, [2]))
    else:
        n_out = _as_1d(g, n)
    bins = g.op("Add", g.op("Div", n_out, _c(g, [2])), _c(g, [1]))  # n//2 + 1 bins are used
    z = _resize(g, self, axis, rank + 1, bins)
    # bins n//2+1 .. n-1 are the conjugates of bins n - k: z[1 : n - bins + 1] reversed
    tail = g.op("Slice", z, _c(g, [1]), g.op("Add", g.op("Sub", n_out, bins), _c(g, [1])), _c(g, [axis]))
    tail = g.op("Slice", tail, _c(g, [-1]), _c(g, [_INT64_MIN]), _c(g, [axis]), _c(g, [-1]))
    import torch

    tail = g.op("Mul", tail, g.op("CastLike", _c(g, [1.0, -1.0], torch.float32), z))
    full = g.op("Concat", z, tail, axis_i=axis)
    out = _dft(g, full, axis, True, False)
    out = g.op("Squeeze", g.op("Slice", out, _c(g, [0]), _c(g, [1]), _c(g, [-1])), _c(g, [-1]))
    return _normalize(g, out, n_out, _const_arg(norm, "s"), True)


def view_as_real(g: Any, self: Any) -> Any:
    return g.op("Identity", self)


def view_as_complex(g: Any, self: Any) -> Any:
    return g.op("Identity", self)


def diff(g: Any, self: Any, n: Any, dim: Any, prepend: Any, append: Any) -> Any:
    h = _helper()
    times, axis = _const_arg(n, "i"), _const_arg(dim, "i")
    parts = [v for v in (prepend, self, append) if not h._is_none(v)]
    x = g.op("Concat", *parts, axis_i=axis) if len(parts) > 1 else self
    for _ in range(times):
        later = g.op("Slice", x, _c(g, [1]), _c(g, [_INT64_MAX]), _c(g, [axis]))
        earlier = g.op("Slice", x, _c(g, [0]), _c(g, [-1]), _c(g, [axis]))
        x = g.op("Sub", later, earlier)
    return x


def unfold(g: Any, self: Any, dimension: Any, size: Any, step: Any) -> Any:
    rank = _rank(self, "unfold")
    axis, size, step = _const_arg(dimension, "i") % max(rank, 1), _const_arg(size, "i"), _const_arg(step, "i")
    length = g.op("Squeeze", _dim_len(g, self, axis), _c(g, [0]))
    windows = g.op("Add", g.op("Div", g.op("Sub", length, _c(g, size)), _c(g, step)), _c(g, 1))
    starts = g.op("Mul", g.op("Range", _c(g, 0), windows, _c(g, 1)), _c(g, step))
    index = g.op("Add", g.op("Unsqueeze", starts, _c(g, [1])), _c(g, [list(range(size))]))  # (windows, size)
    out = g.op("Gather", self, index, axis_i=axis)  # (..., windows, size, ...)
    if axis == rank - 1:
        return out
    perm = list(range(axis + 1)) + list(range(axis + 2, rank + 1)) + [axis + 1]
    return g.op("Transpose", out, perm_i=perm)


def cumsum(g: Any, self: Any, dim: Any, dtype: Any) -> Any:
    """torch's promotion first (bool and integer inputs sum as int64, or as `dtype`): ONNX CumSum takes neither
    bool nor 8/16-bit integers, and the built-in symbolic passes them through (transformers' masks cumsum bools)."""
    import torch

    try:
        from torch.onnx._internal.torchscript_exporter import _type_utils
    except ImportError:  # older layouts
        from torch.onnx import _type_utils  # type: ignore[no-redef,attr-defined]
    h = _helper()
    wanted = _const_arg(dtype, "i")
    if wanted is not None:
        target = _type_utils.JitScalarType(wanted)
    else:
        source = _type_utils.JitScalarType.from_value(self, _type_utils.JitScalarType.UNDEFINED)
        floating = source in (_type_utils.JitScalarType.FLOAT, _type_utils.JitScalarType.DOUBLE,
                              _type_utils.JitScalarType.HALF, _type_utils.JitScalarType.BFLOAT16)
        target = source if floating or source is _type_utils.JitScalarType.UNDEFINED else \
            _type_utils.JitScalarType.from_dtype(torch.int64)
    x = self if target is _type_utils.JitScalarType.UNDEFINED else g.op("Cast", self, to_i=target.onnx_type())
    axis = h._maybe_get_const(dim, "i")
    axis = _c(g, axis) if isinstance(axis, int) else dim
    return g.op("CumSum", x, axis)


def repeat(g: Any, self: Any, repeats: Any) -> Any:
    """aten::repeat: Expand to the repeats' rank (repeats may be longer than the input's rank), then Tile, with the
    repeats as one 1-D int64 tensor whatever the list holds (ints, int64 scalars, counts computed in floats)."""
    import torch

    h = _helper()
    const = h._maybe_get_const(repeats, "is")
    if not h._is_value(const):
        reps = _c(g, [int(r) for r in const])
    elif h._is_packed_list(repeats):
        reps = g.op("Concat", *[_as_1d(g, v) for v in h._unpack_list(repeats)], axis_i=0)
    else:
        reps = g.op("Reshape", g.op("Cast", repeats, to_i=7), _c(g, [-1]))  # 7 = INT64
    ones = g.op("ConstantOfShape", g.op("Shape", reps), value_t=torch.tensor([1], dtype=torch.int64))
    return g.op("Tile", g.op("Expand", self, ones), reps)


def histc(g: Any, self: Any, bins: Any, min: Any, max: Any) -> Any:  # noqa: A002 - aten's argument names
    """aten::histc as torch computes it on the CPU: each value's bin is floor((x - lo) * bins / (hi - lo)) in the
    input's type, a value equal to hi goes in the last bin, values outside [lo, hi] (and NaN) are not counted; when
    lo == hi the data's min and max are used, widened by 1 each way if they are equal too."""
    import torch

    count = _const_arg(bins, "i")
    lo, hi = float(_const_arg(min, "f")), float(_const_arg(max, "f"))
    x = g.op("Reshape", self, _c(g, [-1]))

    def scalar(v: float) -> Any:
        return g.op("CastLike", g.op("Constant", value_t=torch.tensor(v, dtype=torch.float64)), x)

    if lo != hi:
        low, high = scalar(lo), scalar(hi)
    else:
        low, high = g.op("ReduceMin", x, keepdims_i=0), g.op("ReduceMax", x, keepdims_i=0)
        same = g.op("Equal", low, high)
        low = g.op("Where", same, g.op("Sub", low, scalar(1.0)), low)
        high = g.op("Where", same, g.op("Add", high, scalar(1.0)), high)
    scaled = g.op("Div", g.op("Mul", g.op("Sub", x, low), scalar(float(count))), g.op("Sub", high, low))
    index = g.op("Min", g.op("Cast", g.op("Floor", scaled), to_i=7), _c(g, count - 1))  # 7 = INT64
    inside = g.op("And", g.op("GreaterOrEqual", x, low), g.op("LessOrEqual", x, high))
    member = g.op("Equal", g.op("Unsqueeze", index, _c(g, [1])), _c(g, [list(range(count))]))  # (n, bins)
    member = g.op("And", member, g.op("Unsqueeze", inside, _c(g, [1])))
    return g.op("ReduceSum", g.op("CastLike", member, x), _c(g, [0]), keepdims_i=0)


SYMBOLICS = {
    "aten::cumsum": cumsum,
    "aten::histc": histc,
    "aten::repeat": repeat,
    "aten::fft_rfft": fft_rfft,
    "aten::fft_fft": fft_fft,
    "aten::fft_ifft": fft_ifft,
    "aten::fft_irfft": fft_irfft,
    "aten::view_as_real": view_as_real,
    "aten::view_as_complex": view_as_complex,
    "aten::diff": diff,
    "aten::unfold": unfold,
}


@contextlib.contextmanager
def torchscript_symbolics(opset: int, names: Any = None) -> Iterator[None]:
    """Register the symbolics above for one export at `opset`, and unregister them afterwards."""
    import torch

    chosen = {k: v for k, v in SYMBOLICS.items() if names is None or k in names}
    registry = _registry()
    new_groups = {name for name in chosen if registry is not None and registry.get_function_group(name) is None}
    for name, fn in chosen.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for name in chosen:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
        # torch leaves an empty function group behind for an op that had no symbolic before, and the next export
        # that meets the op dies with "ValueError: min() arg is an empty sequence" instead of "unsupported
        # operator": drop such groups (private registry; skipped if its layout changes)
        for name in new_groups:
            try:
                group = registry.get_function_group(name)
                if group is not None and len(group._functions) == 0:
                    del registry._registry[name]
            except (AttributeError, KeyError, TypeError):
                pass


def _registry() -> Any:
    try:
        from torch.onnx._internal.torchscript_exporter import registration
    except ImportError:  # older layouts
        try:
            from torch.onnx._internal import registration  # type: ignore[no-redef,attr-defined]
        except ImportError:
            return None
    return getattr(registration, "registry", None)
