"""The `huggingface` job kind's source builder: a Hugging Face model folder loaded by transformers' Auto classes
from its own files, never the network, with example inputs built from its config.json.

The folder arrives as the archive the client packed (`portq.tasks.state.model_folders`); it is checked again here
(config.json, weights, code shipped with it, the task) and loaded by the plain code every reproduce script carries
(`portq.tasks.sources.hf_recipe`): the task's Auto class, `local_files_only=True` with the offline variables set,
eager attention where the model takes it (onnxruntime's transformer fusion recognises eager attention, not SDPA).
The model is wrapped to take its inputs positionally and return its outputs as a tuple named as the ModelOutput
names them, so the artifacts' outputs are `logits`, `last_hidden_state`, ... and their inputs `input_ids`,
`attention_mask`, `token_type_ids` or `pixel_values`.

Example inputs: token ids within the vocabulary, an attention mask (and token type ids where the model takes
them) at `batch_size` x `sequence_length`, or pixel values at the configured image size and channels; the batch
and sequence dims are dynamic. `--input` specs replace them.

Registered when `builder_for` first asks for the kind, so transformers is imported only by jobs that need it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from portq.tasks.core.contract import HuggingFaceSource, InputSpec, JobKind, JobSpec
from portq.tasks.core.errors import InputError, ModelLoadError, first_line
from portq.tasks.sources import hf_recipe
from portq.tasks.sources.builders import SOURCE_BUILDERS, SourceBuilder
from portq.tasks.sources.loaded import LoadedModel
from portq.tasks.state.model_folders import HF_TASKS, check_folder
from portq.tasks.state.store import Store

STEP = "load"
INSTALL_HINT = "install portq's Hugging Face extra on the worker: pip install 'portq[hf]'"
#: the attention implementation asked for (and recorded: the model may not take it)
ATTENTION = "eager"


def _source(spec: JobSpec) -> HuggingFaceSource:
    source = spec.source
    assert isinstance(source, HuggingFaceSource)
    return source


def _require_transformers(display: str) -> None:
    try:
        with hf_recipe.offline():
            import transformers  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"cannot load a Hugging Face model folder: transformers is not installed ({e})",
                             step=STEP, file=display, hint=INSTALL_HINT) from None


def load_folder(folder: Path, source: HuggingFaceSource, display: str) -> Any:
    """The folder's model for its task (checked again here: a worker does not trust the client's checks)."""
    try:
        check_folder(folder, display, source.task, source.trust_remote_code, step=STEP)
    except InputError as e:
        raise ModelLoadError(e.cause, step=STEP, file=display, hint=e.hint) from None
    auto_class = HF_TASKS.get(source.task).auto_class
    _require_transformers(display)
    try:
        return hf_recipe.load_pretrained(folder, auto_class, source.trust_remote_code, ATTENTION)
    except Exception as e:
        text = first_line(e)
        hint = None
        if "does not recognize this architecture" in text or "model type" in text:
            hint = "the installed transformers does not know this model; upgrade it on the worker"
        elif "trust_remote_code" in text:
            hint = "resubmit with --trust-remote-code if you trust where the folder came from"
        raise ModelLoadError(f"transformers cannot load the folder with {auto_class} (task {source.task}): {text}",
                             step=STEP, file=display, hint=hint) from e


def _config_value(config: Any, *names: str) -> Any:
    """The first of `names` the config (or its text/vision sub-config) sets."""
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return value
    return None


def example_specs(model: Any, source: HuggingFaceSource, display: str, longer_by: int = 0) -> list[InputSpec]:
    """The model's inputs, from its config: text (input_ids, attention_mask, token_type_ids) or images
    (pixel_values). `longer_by`: how far past `sequence_length` parity's draws at other sizes go."""
    params = hf_recipe.forward_parameters(model)
    main = getattr(model, "main_input_name", "input_ids")
    batch, length = source.batch_size, source.sequence_length
    config = model.config
    if main == "input_ids":
        vocab = _config_value(config, "vocab_size")
        if not vocab:
            raise InputError("config.json has no vocab_size to draw token ids from", step="inputs", file=display,
                             hint="give --input 'input_ids:int64[batch=2,sequence=16]{0,VOCAB}'")
        longest = _config_value(config, "max_position_embeddings", "n_positions")
        if isinstance(longest, int) and length + longer_by > longest:
            raise InputError(f"--sequence-length {length} (parity also runs {longer_by} longer) is over the model's "
                             f"max_position_embeddings of {longest}", step="inputs", file=display,
                             hint=f"give --sequence-length {max(1, longest - longer_by)} or less")
        text = {0: "batch", 1: "sequence"}
        specs = [InputSpec(name="input_ids", dtype="int64", shape=[batch, length], dynamic=dict(text), low=0,
                           high=int(vocab))]
        if "attention_mask" in params:
            specs.append(InputSpec(name="attention_mask", dtype="int64", shape=[batch, length], dynamic=dict(text),
                                   low=0, high=2))
        types = _config_value(config, "type_vocab_size")
        if "token_type_ids" in params and isinstance(types, int) and types > 0:
            specs.append(InputSpec(name="token_type_ids", dtype="int64", shape=[batch, length], dynamic=dict(text),
                                   low=0, high=types))
        return specs
    if main == "pixel_values":
        size = _config_value(config, "image_size")
        channels = _config_value(config, "num_channels") or 3
        if size is None:
            raise InputError("config.json has no image_size to make pixel values at", step="inputs", file=display,
                             hint="give --input 'pixel_values:float32[batch=2,3,224,224]'")
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        return [InputSpec(name="pixel_values", dtype="float32", shape=[batch, int(channels), height, width],
                          dynamic={0: "batch"})]
    raise InputError(f"the model's main input is {main!r}, which portq does not build examples of (it builds "
                     "input_ids and pixel_values)", step="inputs", file=display,
                     hint="give --input specs for the model's forward arguments, in order")


def build_huggingface(spec: JobSpec, store: Store) -> LoadedModel:
    """The job's model: the folder unpacked, loaded offline for its task and wrapped (see the module's doc)."""
    import numpy as np
    import torch
    from portq.tasks.sources.inputs import InputSignature, random_sample

    source = _source(spec)
    display = source.display
    with store.local_file(source.model.key) as archive, tempfile.TemporaryDirectory(prefix="portq-hf-") as tmp:
        try:
            folder = hf_recipe.unpack_folder(archive, tmp)
        except (hf_recipe.UnsafeArchive, OSError, EOFError, ValueError) as e:
            raise ModelLoadError(f"the packed folder cannot be unpacked: {first_line(e)}", step=STEP,
                                 file=display) from None
        model = load_folder(folder, source, display)
    longer = max(spec.options.parity.random_samples, 1) if not spec.options.inputs else 0
    specs = example_specs(model, source, display, longer)
    names = [s.name for s in spec.options.inputs] or [s.name for s in specs]
    unknown = [n for n in names if n not in hf_recipe.forward_parameters(model)]
    if unknown:
        raise InputError(f"--input {unknown[0]!r} is not an argument of {type(model).__name__}.forward",
                         step="inputs", file=display)
    sample = random_sample(InputSignature(list(spec.options.inputs) or specs), np.random.default_rng(0))
    example = {n: torch.from_numpy(a) for n, a in zip(names, sample)}
    try:
        outputs = hf_recipe.output_names_of(model, example)
    except Exception as e:
        raise InputError(f"the model rejected its example inputs: {type(e).__name__}: {first_line(e)}",
                         step="inputs", file=display) from e
    module = hf_recipe.outputs_as_tuple(model, names, outputs)
    architecture = type(model).__name__
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    notes = [f"Hugging Face {architecture} for {source.task}, loaded by {HF_TASKS.get(source.task).auto_class} "
             f"from the folder's files only; attention implementation: {attention}"]
    if not spec.options.inputs:
        notes.append(f"inputs built from config.json: {', '.join(names)} at batch {source.batch_size}"
                     + (f", sequence {source.sequence_length}" if specs[0].name == "input_ids" else "")
                     + " (dynamic)")
    return LoadedModel(kind=JobKind.huggingface.value, module=module, input_names=names, input_specs=specs,
                       notes=notes)


def script_settings(spec: JobSpec, model: LoadedModel, store: Store) -> dict[str, Any]:
    """What a reproduce script's `build_source` reads to load the folder again as portq did."""
    source = _source(spec)
    wrapper = model.module
    attention = getattr(wrapper.model.config, "_attn_implementation", None)
    return {"kind": JobKind.huggingface.value, "model": store.url(source.model.key),
            "auto_class": HF_TASKS.get(source.task).auto_class, "trust_remote_code": source.trust_remote_code,
            "attention": attention if attention == ATTENTION else None,
            "input_names": list(wrapper.portq_input_names), "output_names": list(wrapper.portq_output_names)}


SOURCE_BUILDERS.add(JobKind.huggingface.value, SourceBuilder(build=build_huggingface, script_settings=script_settings,
                                                             script_modules=lambda: (hf_recipe,)))
