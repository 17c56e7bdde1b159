"""Imported once by the isolation forkserver (never by a worker's main process): torch, the exporters and
what they import lazily on their first export, so that each step's child starts with all of it loaded.

Without this, every isolated step paid the first-export imports again (about 1.5 s on 2 CPU cores for a
tiny model); with it, a child's first torch.export takes what a warm process's does. It also builds the
ONNX exporter's translation table once (`portq.tasks.formats.exporter_cache`). Imports only: no torch op
runs here, so no thread pool or device state exists to be inherited by the forked children.
"""

from __future__ import annotations

import gc
import importlib

from portq.tasks.execution.forkserver import in_forkserver

_IN_FORKSERVER = in_forkserver()
if _IN_FORKSERVER:
    # No collection while importing: the imports allocate hundreds of thousands of objects that live as long as the
    # forkserver, and the collections they set off scanned them again and again (torch and the exporters imported
    # in 1.9-2.2 s with it off, 2.6-3.1 s with it on, on 2 cores: on a first run's critical path). Back on, with
    # all of it frozen, below.
    gc.disable()

MODULES = (
    "numpy", "torch", "torch.export", "torch.onnx", "onnx", "onnxruntime", "onnxscript",
    "portq.tasks.execution.run", "portq.tasks.formats", "portq.tasks.checks.parity", "portq.tasks.checks.latency",
    "portq.tasks.sources.loading",
    "portq.tasks.sources.checkpoints", "portq.tasks.sources.inputs", "portq.tasks.fusion.builder",
    "portq.tasks.fusion.recipe",
    # lazily imported by the first torch.export / torch.onnx.export / TorchScript conversion
    "sympy", "networkx", "torch._dynamo", "torch._functorch.aot_autograd", "torch.fx.experimental.symbolic_shapes",
    "torch.fx.experimental.validator", "torch.export._trace", "torch._decomp", "torch._export.serde.serialize",
    "torch._export.converter", "torch._export.passes.replace_set_grad_with_hop_pass",
    "torch._inductor.fx_passes.dedupe_symint_uses", "torch._subclasses.schema_check_mode",
    "torch.onnx._internal.exporter._core", "torch.onnx._internal.exporter._compat",
    "torch.onnx._internal.exporter._torchlib.ops", "onnxscript.function_libs.torch_lib.ops",
    "onnxscript.rewriter", "onnxscript.rewriter.onnx_fusions", "onnxscript.optimizer", "onnxscript._framework_apis",
    # what a step imports on its way (a step's process imported these, 0.06 s, on every step)
    "psutil", "numpy.ma", "portq.tasks.checks.memory", "portq.tasks.formats.reproduce",
)

#: what failed to import (a library missing from this install is fine: its formats fail on their own)
FAILED: dict[str, str] = {}

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception as _e:  # a broken optional import must not take the forkserver down
        FAILED[_name] = f"{type(_e).__name__}: {_e}"

# The ONNX exporter's translation table (pure Python, no torch op runs): built here once, not by every step.
try:
    from portq.tasks.formats import exporter_cache

    exporter_cache.warm()
except Exception as _e:
    FAILED["portq.tasks.formats.exporter_cache"] = f"{type(_e).__name__}: {_e}"

# The modules a reproduce script copies, read and parsed once here (0.1 s of every step's script otherwise).
try:
    from portq.tasks.formats import reproduce

    reproduce.warm_sources()
except Exception as _e:
    FAILED["portq.tasks.formats.reproduce"] = f"{type(_e).__name__}: {_e}"


if _IN_FORKSERVER:
    from portq.tasks.execution.process_exit import skip_teardown_at_exit

    # What was imported lives as long as the forkserver: the garbage collector of each step's process leaves it
    # alone. A full collection there scanned all 430,000 objects (0.22 s on 2 cores, which a step that allocates
    # much, such as an export, paid at least once) and wrote into their pages, which the step then copied. No
    # collection before: imports leave no cyclic garbage (it found none) and it took 0.27 s of the first step's wait.
    gc.freeze()
    gc.enable()
    # The forkserver ends when the process that started it does; without the teardown of all of the above (1.5 s,
    # while it held that process's stdout and stderr open). Its children end with os._exit and never get here.
    skip_teardown_at_exit()
