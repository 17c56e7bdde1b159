"""A TorchScript archive made ready for the exporters: a rewritten copy, checked against the archive itself.

`prepare_script(script, args, opts)` returns a copy of the archive (a save/load round trip: its own compilation
unit, so the source model is never touched) whose inlined forward graph holds only ops the exporters know:

  1. `script_unfuse.unfuse_graph`      PyTorch's fused transformer fast paths -> plain ops (the nested-tensor path
                                       of a masked TransformerEncoder -> dense ops and a key padding mask)
  2. `script_complex.lower_complex`    complex arithmetic (torch.polar rotary embeddings, complex filters) -> real
                                       (..., 2) tensors, FFTs left as islands that `symbolics` translates

Every rewrite is checked before anything is exported: the copy must reproduce the archive on the example inputs
(and on the inputs with every dynamic dim one longer), or it is refused. The notes say what was rewritten; the
route returns them, and the artifact's report shows them.

Plain torch only: portq's recipes use it, and the reproduce scripts of the TorchScript routes carry a copy.
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.rewrites.script_complex import lower_complex  # portq-only
from portq.tasks.formats.rewrites.script_unfuse import clone_script, fused_ops, unfuse_graph  # portq-only

#: the self-check's tolerance: a rewrite is the same computation, so only float reassociation may differ
REWRITE_ATOL, REWRITE_RTOL = 1e-5, 1e-4


class RewriteMismatch(RuntimeError):
    """The rewritten archive does not reproduce the original; nothing is exported from it."""


def _flat_outputs(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_outputs(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_outputs(o)]
    return []


def check_same(original: Any, rewritten: Any, arg_sets: list[tuple[Any, ...]]) -> None:
    """Raise RewriteMismatch unless `rewritten` reproduces `original` on every input set."""
    import torch

    for args in arg_sets:
        with torch.no_grad():
            ref, got = _flat_outputs(original(*args)), _flat_outputs(rewritten(*args))
        if len(ref) != len(got):
            raise RewriteMismatch(f"the rewrite changed the number of outputs ({len(got)} vs {len(ref)})")
        for i, (r, g) in enumerate(zip(ref, got)):
            if r.shape != g.shape or not torch.allclose(r, g, atol=REWRITE_ATOL, rtol=REWRITE_RTOL, equal_nan=True):
                err = (r.double() - g.double()).abs().max().item() if r.shape == g.shape else "a different shape"
                raise RewriteMismatch(f"the rewritten archive changed output {i} (max abs err {err}); refusing to "
                                      "export it")


def prepare_script(script: Any, args: tuple[Any, ...], arg_sets: list[tuple[Any, ...]]) -> tuple[Any, list[str]]:
    """A rewritten copy of `script` (see the module doc) and notes on what was rewritten (empty: nothing was, and
    the copy computes exactly what the archive does). `arg_sets`: the inputs the rewrite is checked on."""
    import torch

    clone = clone_script(script)
    graph = clone.forward.graph
    torch._C._jit_pass_inline(graph)
    notes = unfuse_graph(graph) if fused_ops(script) else []
    notes += lower_complex(clone, args)
    if notes:
        check_same(script, clone, arg_sets)
    return clone, notes
