"""The TorchScript export recipes, in plain torch: the routes of `portq.tasks.formats.torchscript` and its `frozen`
variant's recipe. A TorchScript artifact's reproduce script carries a copy of this file's source (and of the shared
`portq.tasks.formats.recipes`), so it imports torch inside functions, never portq.
"""

from __future__ import annotations

from typing import Any

from portq.tasks.formats.recipes import NotApplicable, _dynamic, _torch_source, resized_args  # portq-only


def torchscript_passthrough(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """The source archive itself, saved again."""
    import torch

    if source.script is None:
        raise NotApplicable("the source is not a TorchScript archive")
    torch.jit.save(source.script, path)


def torchscript_trace(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.jit.trace of the nn.Module (or the program's module), dict and nested outputs allowed.

    With dynamic dims, the module is traced at two sizes: a trace that records a size as a constant (its
    code differs between the sizes) would compute garbage, or crash, at other sizes, so it is refused.
    """
    _torch_source(source)
    import torch

    if source.script is not None:
        raise NotApplicable("the source is already TorchScript")

    def trace(example: tuple[Any, ...]) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return torch.jit.trace(source.module, example, strict=False, check_trace=False)

    traced = trace(args)
    if _dynamic(opts):
        other = resized_args(args, opts)
        if trace(other).code != traced.code:
            dims = sorted({n for axes in _dynamic(opts).values() for n in axes.values()})
            raise RuntimeError(
                f"torch.jit.trace records the size of dynamic dim {', '.join(dims)} as a constant (the traced "
                f"code differs between sizes), so the TorchScript would be wrong at other sizes")
    torch.jit.save(traced, path)


def torchscript_frozen(in_path: str, out_path: str, opts: dict[str, Any]) -> dict[str, Any]:
    """torch.jit.freeze of a TorchScript artifact (parameters inlined as constants, Conv+BN folded). The frozen
    module is what is saved: `torch.jit.optimize_for_inference`'s MKLDNN rewrites cannot be serialized, so
    the artifact is opened with `optimize_for_inference` applied at load (its option of that name)."""
    import torch

    module = torch.jit.load(in_path, map_location="cpu").eval()
    frozen = torch.jit.freeze(module)
    torch.jit.save(frozen, out_path)
    count = sum(1 for _ in frozen.graph.nodes())
    return {"graph_nodes_before": sum(1 for _ in module.inlined_graph.nodes()), "graph_nodes_after": count,
            "load_with": {"optimize_for_inference": True}}


def torchscript_script(source: Any, args: tuple[Any, ...], path: str, opts: dict[str, Any]) -> None:
    """torch.jit.script of the Python nn.Module."""
    import torch

    if source.script is not None or source.program is not None:
        raise NotApplicable("only Python nn.Modules can be scripted")
    torch.jit.save(torch.jit.script(source.module), path)
