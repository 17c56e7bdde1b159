"""The ONNX format: its handler and routes (`handler`), export recipes (`export`), variants with their configs
(`variants`), optimization recipes (`optimize`, `transformer`, `precision`) and first-divergence localisation
(`localise`).

Importing the package registers the format and every variant: it imports each of its modules, so a variant that
lives in a module of its own (`shape_inference`) needs no other edit to be registered.
"""

import importlib
import pkgutil

from portq.tasks.formats.onnx.export import DEFAULT_OPSET, onnx_opset
from portq.tasks.formats.onnx.handler import FILENAME, ONNX, OnnxOptions
from portq.tasks.formats.onnx.variants import derive_route_families, onnx_variant

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
derive_route_families()  # after every module: each route family gets a copy of every optimization

__all__ = ["DEFAULT_OPSET", "FILENAME", "ONNX", "OnnxOptions", "onnx_opset", "onnx_variant"]
