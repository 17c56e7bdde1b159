"""TorchScript archives prepared for export (fused fast paths and complex values rewritten into plain ops, every value
typed): plain torch modules that the ONNX, ExportedProgram and AOTInductor recipes use on TorchScript sources, and
that the reproduce scripts of the routes taking archives carry (`SCRIPT_REWRITES`). Registers nothing.
"""

from types import ModuleType

from portq.tasks.formats.rewrites import script_complex, script_prepare, script_unfuse

#: the plain modules a route that may take an archive lists, so its reproduce script carries them
SCRIPT_REWRITES: tuple[ModuleType, ...] = (script_unfuse, script_complex, script_prepare)
