"""The source side of first-divergence localisation: the source as the ExportedProgram the routes export
(`portq.tasks.checks.divergence` compares graphs; the formats build them)."""

from __future__ import annotations

from typing import Any

from portq.tasks.checks.evidence import SourceEvidence


def export_inputs(ev: SourceEvidence) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example the artifacts were exported with, and the recipes' options, rebuilt from the evidence."""
    from portq.tasks.checks.runners import to_tensors

    return to_tensors(ev.export_sample, ev.device), ev.recipe_options()


def source_program(model: Any, ev: SourceEvidence) -> Any:
    """An ExportedProgram that computes what the source computes, built the way the export routes build it
    (same example, same dynamic dims; TorchScript is converted first)."""
    from portq.tasks.formats.recipes import exported_program

    args, opts = export_inputs(ev)
    return exported_program(model, args, opts)
