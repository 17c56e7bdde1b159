"""Calibration samples for static quantization (`--calibration PATH`): .npz files, read and checked
against the model's inputs before any artifact is made.

A file holds either one sample (one array per input, named after the model's inputs or in forward
order) or several in the layout of `reproduce_inputs.npz` (`s<i>_<j>`: sample i, input j). A directory
is every .npz in it, in name order.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from portq.tasks.core.contract import SourceRef
from portq.tasks.core.errors import InputError
from portq.tasks.sources.inputs import InputSignature
from portq.tasks.state.store import Store

_SAMPLE_KEY = re.compile(r"^s(\d+)_(\d+)$")


def read_calibration(refs: list[SourceRef], store: Store, sig: InputSignature) -> list[list[np.ndarray]]:
    """Every calibration sample, checked against the signature (InputError names the file, input and shapes)."""
    samples: list[list[np.ndarray]] = []
    for ref in refs:
        with store.local_file(ref.key) as path, np.load(path, allow_pickle=False) as data:
            found = _samples_in(dict(data.items()), sig, ref.name)
        for sample in found:
            _check(sample, sig, ref.name)
        samples += found
    return samples


def _samples_in(arrays: dict[str, Any], sig: InputSignature, display: str) -> list[list[np.ndarray]]:
    layout = {k: _SAMPLE_KEY.match(k) for k in arrays}
    if arrays and all(layout.values()):
        count = 1 + max(int(m.group(1)) for m in layout.values() if m)
        return [[arrays[f"s{i}_{j}"] for j in range(len(sig.specs)) if f"s{i}_{j}" in arrays] for i in range(count)]
    if all(name in arrays for name in sig.names):
        return [[arrays[name] for name in sig.names]]
    if len(arrays) == len(sig.specs):
        return [list(arrays.values())]
    raise InputError(f"calibration file has arrays {sorted(arrays)}, the model takes {', '.join(sig.names)}",
                     step="calibration", file=display,
                     hint="one array per model input, named after it (or s<i>_<j> for several samples)")


def _check(sample: list[np.ndarray], sig: InputSignature, display: str) -> None:
    if len(sample) != len(sig.specs):
        raise InputError(f"a calibration sample has {len(sample)} arrays, the model takes {len(sig.specs)} inputs",
                         step="calibration", file=display)
    for spec, array in zip(sig.specs, sample):
        fixed = [d for axis, d in enumerate(spec.shape) if axis not in spec.dynamic]
        got = [d for axis, d in enumerate(array.shape) if axis not in spec.dynamic]
        if array.ndim != len(spec.shape) or fixed != got:
            raise InputError(f"calibration input {spec.name} has shape {list(array.shape)}, the model's is "
                             f"{spec.shape}" + (f" (dims {sorted(spec.dynamic.values())} may vary)" if spec.dynamic
                                                else ""), step="calibration", file=display)
        if array.dtype.kind != np.dtype(spec.dtype if spec.dtype != "bfloat16" else "float32").kind:
            raise InputError(f"calibration input {spec.name} is {array.dtype}, the model takes {spec.dtype}",
                             step="calibration", file=display)
