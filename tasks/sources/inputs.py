"""Example inputs: from a sidecar .npz, from `--input` specs, or from what a .pt2 program carries.

Parity runs on the user's sample plus seeded random draws that respect each input's dtype and range.
Everything here is numpy; torch tensors are made at the edge (`portq.tasks.checks.runners`).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from portq.tasks.core.contract import InputSpec
from portq.tasks.core.errors import InputError

Sample = list[np.ndarray]


@dataclass
class InputSignature:
    """What each positional input looks like: enough to draw random inputs of the same kind."""

    specs: list[InputSpec]
    source: str = "spec"  # spec | npz | config | program
    samples: list[Sample] = field(default_factory=list)  # the user's own samples, if any

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": s.name, "dtype": s.dtype, "shape": s.shape, "dynamic": {str(k): v for k, v in s.dynamic.items()},
             "low": s.low, "high": s.high, "from": self.source}
            for s in self.specs
        ]


def _npz_order(names: list[str]) -> list[str]:
    # np.savez(f, a, b) names arrays arr_0, arr_1, ...; keep those in numeric order, others as stored.
    if names and all(re.fullmatch(r"arr_\d+", n) for n in names):
        return sorted(names, key=lambda n: int(n[4:]))
    return names


def load_npz(path: Path, display: str) -> tuple[list[str], Sample]:
    """Arrays of a sidecar `<stem>.npz`, in forward-argument order."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = _npz_order(list(data.files))
            arrays = [np.asarray(data[n]) for n in names]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read sample arrays: {e}", step="inputs", file=display,
                         hint="the sidecar must be an .npz written by numpy.savez") from e
    if not arrays:
        raise InputError("the sample .npz holds no arrays", step="inputs", file=display)
    return names, arrays


def spec_for_array(name: str, array: np.ndarray) -> InputSpec:
    dtype = str(array.dtype)
    low = high = None
    if array.dtype.kind in "iu" and array.size:
        low, high = float(array.min()), float(array.max()) + 1.0
    elif array.dtype.kind == "f" and array.size:
        low, high = float(array.min()), float(array.max())
        if not low < high:
            low, high = None, None
    return InputSpec(name=name, dtype=dtype if dtype != "bool" else "bool", shape=list(array.shape), low=low, high=high)


def signature_from_arrays(names: list[str], sample: Sample, source: str) -> InputSignature:
    return InputSignature([spec_for_array(n, a) for n, a in zip(names, sample)], source=source, samples=[sample])


def random_sample(
    sig: InputSignature, rng: np.random.Generator, shape_override: dict[str, int] | None = None
) -> Sample:
    """One draw per input: integers uniform in [low, high), floats normal (or uniform in a given range), bools fair."""
    out: Sample = []
    for spec in sig.specs:
        shape = list(spec.shape)
        for axis, dim_name in spec.dynamic.items():
            if shape_override and dim_name in shape_override:
                shape[axis] = shape_override[dim_name]
        dt = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
        if dt.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif dt.kind in "iu":
            if spec.low is None or spec.high is None:
                raise InputError(f"input {spec.name!r} is an integer input without a value range", step="inputs",
                                 hint=f"give --input '{spec.name}:{spec.dtype}[...]{{low,high}}'")
            arr = rng.integers(int(spec.low), max(int(spec.high), int(spec.low) + 1), size=shape).astype(dt)
        elif spec.low is not None and spec.high is not None:
            arr = rng.uniform(spec.low, spec.high, size=shape).astype(dt)
        else:
            arr = rng.standard_normal(size=shape).astype(dt)
        out.append(arr)
    return out


def resolve_signature(
    specs: list[InputSpec],
    npz: tuple[list[str], Sample] | None,
    example_inputs: tuple[object, ...] | None,
    model_names: list[str],
    display: str,
    model_specs: list[InputSpec] | None = None,
) -> InputSignature:
    """Decide the inputs: a sidecar .npz, else --input specs, else the specs the source builds from its own
    description (a Hugging Face folder's config.json), else the example inputs a .pt2 carries.

    With both an .npz and --input specs, the arrays are the sample and the specs say how to draw more.
    Names come from --input, else the model's forward signature, else the .npz.
    """
    if npz is not None:
        names, arrays = npz
        if specs:
            if len(specs) != len(arrays):
                raise InputError(f"{len(specs)} --input specs but the sample .npz holds {len(arrays)} arrays",
                                 step="inputs", file=display)
            return InputSignature(list(specs), source="npz", samples=[arrays])
        if len(model_names) == len(arrays) and all(re.fullmatch(r"arr_\d+", n) for n in names):
            names = model_names
        return signature_from_arrays(names, arrays, "npz")
    if specs:
        return InputSignature(list(specs), source="spec")
    if model_specs:
        return InputSignature([s.model_copy(deep=True) for s in model_specs], source="config")
    if example_inputs:
        arrays = []
        for i, t in enumerate(example_inputs):  # torch tensors, duck-typed: this module does not import torch
            t = cast(Any, t)
            if not hasattr(t, "detach"):
                raise InputError(f"example input {i} carried by the program is a {type(t).__name__}, not a tensor",
                                 step="inputs", file=display, hint="give --input specs or a sidecar .npz")
            arrays.append(t.detach().cpu().float().numpy() if str(t.dtype) == "torch.bfloat16"
                          else t.detach().cpu().numpy())
        names = model_names if len(model_names) == len(arrays) else [f"input_{i}" for i in range(len(arrays))]
        return signature_from_arrays(names, arrays, "program")
    raise InputError(
        "no example inputs: portq needs to know what the model takes", step="inputs", file=display,
        hint="put a sidecar <stem>.npz beside the model (arrays in forward-argument order) or pass "
             "--input 'name:float32[1,3,224,224]' (integers need a range: 'ids:int64[2,16]{0,30000}')",
    )


def apply_dynamic(sig: InputSignature, dynamic: list[str]) -> None:
    """`--dynamic batch` marks axis 0 of every input as the dim `batch`; other names must appear in specs."""
    declared = {name for s in sig.specs for name in s.dynamic.values()}
    for name in dynamic:
        if name == "batch":
            for s in sig.specs:
                if s.shape and 0 not in s.dynamic:
                    s.dynamic[0] = "batch"
        elif name not in declared:
            raise InputError(f"--dynamic {name!r} names no dimension of the inputs", step="inputs",
                             hint="name dims in --input specs, e.g. 'ids:int64[batch=2,seq=16]{0,100}'")


def check_dynamic_support(program: object, sig: InputSignature, display: str) -> None:
    """A saved ExportedProgram keeps the dims it was exported with: a dim it fixed cannot be made dynamic here.

    (Its graph may bake that size into reshapes, and the program itself refuses other sizes, so there would be
    no reference to check other sizes against.)
    """
    if program is None:
        return
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}  # type: ignore[attr-defined]
    user_inputs = list(program.graph_signature.user_inputs)  # type: ignore[attr-defined]
    for i, spec in enumerate(sig.specs):
        if i >= len(user_inputs) or user_inputs[i] not in placeholders:
            continue
        value = placeholders[user_inputs[i]].meta.get("val")
        shape = getattr(value, "shape", None)
        for axis, name in spec.dynamic.items():
            if shape is not None and axis < len(shape) and isinstance(shape[axis], int):
                raise InputError(
                    f"--dynamic {name}: the ExportedProgram was exported with input {spec.name!r} axis {axis} "
                    f"fixed at {shape[axis]}, so it cannot run (or be checked) at other sizes", step="inputs",
                    file=display, hint=f"export it again with torch.export.Dim('{name}') for that axis in "
                                       f"dynamic_shapes, or drop --dynamic {name}")


def dynamic_dims(sig: InputSignature) -> dict[str, int]:
    """Each dynamic dim's name and its size in the signature."""
    return {name: s.shape[axis] for s in sig.specs for axis, name in s.dynamic.items()}


def parity_samples(sig: InputSignature, random_draws: int, seed: int) -> list[Sample]:
    """The user's samples, then seeded random draws; with dynamic dims, half the draws use other sizes.

    With dynamic dims there is always at least one draw at other sizes, so parity checks two sizes at least.
    """
    rng = np.random.default_rng(seed)
    samples = [list(s) for s in sig.samples]
    dims = dynamic_dims(sig)
    draws = max(random_draws, 1) if dims else random_draws
    for i in range(draws):
        other_sizes = bool(dims) and (i % 2 == 1 or draws == 1)
        override = {name: size + 1 + i for name, size in dims.items()} if other_sizes else None
        samples.append(random_sample(sig, rng, override))
    if not samples:
        samples.append(random_sample(sig, rng))
    return samples


def export_sample_index(sig: InputSignature, samples: list[Sample]) -> int | None:
    """Which sample the exporters should trace with: one where every dynamic dim has size 2 or more.

    torch.export specializes sizes 0 and 1 (a dim of size 1 would come out static), so with dynamic dims a
    size-1 example is no example. None when no sample qualifies (draw one with `export_sample`).
    """
    for i, sample in enumerate(samples):
        if all(sample[j].shape[axis] >= 2 for j, s in enumerate(sig.specs) for axis in s.dynamic):
            return i
    return None


def export_sample(sig: InputSignature, seed: int) -> Sample:
    """A random draw with every dynamic dim at size 2 or more."""
    override = {name: max(size, 2) for name, size in dynamic_dims(sig).items()}
    return random_sample(sig, np.random.default_rng(seed + 1), override)
