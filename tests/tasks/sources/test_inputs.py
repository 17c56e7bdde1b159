"""Example inputs: parity samples cover other sizes of dynamic dims; exporters never trace at size 1."""

import numpy as np
import pytest
from portq.tasks.core.contract import InputSpec
from portq.tasks.core.errors import InputError
from portq.tasks.sources.inputs import (
    InputSignature,
    apply_dynamic,
    export_sample,
    export_sample_index,
    parity_samples,
)


def _sig(*specs: str) -> InputSignature:
    return InputSignature([InputSpec.parse(s) for s in specs])


def test_named_dims_in_specs_are_dynamic_and_parity_draws_other_sizes():
    sig = _sig("ids:int64[batch=2,seq=16]{0,100}", "mask:bool[batch=2,seq=16]")
    apply_dynamic(sig, ["batch", "seq"])
    samples = parity_samples(sig, random_draws=2, seed=0)
    shapes = [tuple(a.shape for a in s) for s in samples]
    assert shapes[0] == ((2, 16), (2, 16))
    assert shapes[1] != shapes[0] and shapes[1][0] == shapes[1][1], "inputs sharing a dim name share its size"
    assert all(a.max() < 100 and a.min() >= 0 for s in samples for a in s[:1])


@pytest.mark.parametrize("draws", [0, 1])
def test_dynamic_dims_always_get_a_sample_at_another_size(draws):
    sig = _sig("x:float32[batch=3,4]")
    samples = parity_samples(sig, random_draws=draws, seed=0)
    assert {s[0].shape[0] for s in samples} - {3}, "no sample at another batch size"


def test_static_inputs_keep_their_shape():
    sig = _sig("x:float32[3,4]")
    assert {s[0].shape for s in parity_samples(sig, 2, 0)} == {(3, 4)}


def test_batch_flag_marks_axis_zero_of_every_input_and_unknown_names_fail():
    sig = _sig("x:float32[2,4]", "y:int64[2]{0,5}")
    apply_dynamic(sig, ["batch"])
    assert [s.dynamic for s in sig.specs] == [{0: "batch"}, {0: "batch"}]
    with pytest.raises(InputError, match="names no dimension"):
        apply_dynamic(sig, ["seq"])


def test_exporters_get_an_example_with_dynamic_dims_of_two_or_more():
    """torch.export specializes sizes 0 and 1: exporting at batch 1 would give a static artifact."""
    sig = _sig("x:float32[batch=1,4]")
    samples = [[np.zeros((1, 4), np.float32)]]
    assert export_sample_index(sig, samples) is None
    drawn = export_sample(sig, seed=0)
    assert drawn[0].shape == (2, 4)
    samples.append(drawn)
    assert export_sample_index(sig, samples) == 1
    assert export_sample_index(_sig("x:float32[1,4]"), [[np.zeros((1, 4), np.float32)]]) == 0
