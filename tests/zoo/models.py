"""The model zoo: small architectures built in code with seeded random weights (nothing is downloaded).

Each `ZooCase` builds a module and example inputs. `tests/zoo/build.py` saves every case as a TorchScript
archive (traced or scripted, as the case says) and as an ExportedProgram, with a sidecar .npz, and the
zoo tests convert every file to every format. Families group the cases in the printed success table.

The transformers models are tiny configurations of the real classes (BERT, DistilBERT, GPT-2, Llama, ViT,
ResNet, ConvNeXt); the rest are the shapes of model people actually ship: RNNs, depthwise CNNs, a U-Net,
top-k heads, dict and nested outputs, two-input models, masked attention, integer and boolean inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 100

#: why TorchScript from a dynamic ExportedProgram fails for models whose graph computes with the batch size
TRACE_FIXES_BATCH = {"torchscript:exported_program": "torch.jit.trace records the size of dynamic dim batch"}


@dataclass
class ZooCase:
    name: str
    family: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    names: list[str]  # forward-argument names, in order (the sidecar .npz keys)
    # TorchScript by trace or script; ExportedProgram by export; a whole pickled module (torch.save) by pickle
    save_as: tuple[str, ...] = ("trace", "export")
    # format or "format:file kind" -> a regex the failure must match; absent means it must convert with parity
    expected_failures: dict[str, str] = field(default_factory=dict)
    # the whole job must fail before any format, with an error matching this regex (a model portq refuses)
    refused: str | None = None
    # file kind -> a regex that the job's or an artifact's notes must match (what portq rewrote, and said so)
    notes: dict[str, str] = field(default_factory=dict)
    # build and save in a fresh process: what the build registers (a custom operator library) stays there
    save_in_subprocess: bool = False
    dynamic_batch: bool = True  # convert with --dynamic batch (parity then also runs at another batch size)
    # file kinds also compiled with AOTInductor (8-16 s a model on 2 cores, so a representative few)
    aoti: tuple[str, ...] = ()

    @property
    def kinds(self) -> list[str]:
        """The file kinds this case is saved as (tests/zoo/build.py KINDS)."""
        wanted = {"trace": "torchscript", "script": "torchscript", "export": "exported_program",
                  "pickle": "pickled_module"}
        return list(dict.fromkeys(wanted[s] for s in self.save_as))


ZOO: dict[str, ZooCase] = {}


def case(name: str, family: str, names: list[str], **kw: Any) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def add(build: Callable[[], Any]) -> Callable[[], Any]:
        assert name not in ZOO, name
        ZOO[name] = ZooCase(name=name, family=family, build=build, names=names, **kw)
        return build

    return add


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _mask(batch: int = 2, seq: int = 8, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=dtype)
    mask[-1, seq // 2:] = 0  # a padded row: masks must really mask
    return mask


# ------------------------------------------------------------------------------- transformers, tiny configs

def _tiny_text(**extra: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, **extra)


class _Tuple(nn.Module):
    """What people trace: the transformers model with plain tuple outputs (return_dict=False)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class TextTuple(_Tuple):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)


class ImageTuple(_Tuple):
    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.model(pixel_values=pixel_values, return_dict=False)


@case("bert", "transformers-encoder", ["input_ids", "attention_mask"], expected_failures=TRACE_FIXES_BATCH,
      aoti=("exported_program",))
def bert() -> Any:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**_tiny_text(), attn_implementation="eager"))
    return TextTuple(model), (_ids(), _mask())


@case("distilbert_cls", "transformers-encoder", ["input_ids", "attention_mask"],
      expected_failures=TRACE_FIXES_BATCH)
def distilbert_cls() -> Any:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                           num_labels=3, attn_implementation="eager")
    return TextTuple(DistilBertForSequenceClassification(cfg)), (_ids(), _mask())


@case("gpt2_dict", "transformers-decoder", ["input_ids"], expected_failures=TRACE_FIXES_BATCH, aoti=("torchscript",))
def gpt2_dict() -> Any:
    """GPT-2 returning its ModelOutput: traced, the archive holds prim::DictConstruct."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg), (_ids(),)


@case("llama", "transformers-decoder", ["input_ids", "attention_mask"], expected_failures=TRACE_FIXES_BATCH,
      aoti=("exported_program",))
def llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_tiny_text(num_key_value_heads=2), use_cache=False, attn_implementation="eager")
    return TextTuple(LlamaForCausalLM(cfg)), (_ids(), _mask())


@case("vit", "transformers-vision", ["pixel_values"], expected_failures=TRACE_FIXES_BATCH, aoti=("exported_program",))
def vit() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, attn_implementation="eager")
    return ImageTuple(ViTForImageClassification(cfg)), (torch.randn(2, 3, 32, 32),)


@case("resnet", "transformers-conv", ["pixel_values"], aoti=("exported_program",))
def resnet() -> Any:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=4)
    return ImageTuple(ResNetForImageClassification(cfg)), (torch.randn(2, 3, 32, 32),)


@case("convnext", "transformers-conv", ["pixel_values"])
def convnext() -> Any:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=4)
    return ImageTuple(ConvNextForImageClassification(cfg)), (torch.randn(2, 3, 32, 32),)


# ------------------------------------------------------------------------------------------------- RNNs

class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out)


@case("lstm_tagger", "rnn", ["ids"], expected_failures=TRACE_FIXES_BATCH, aoti=("exported_program",))
def lstm_tagger() -> Any:
    return LSTMTagger(), (_ids(),)


class GRURegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.gru(series)
        return self.head(out[:, -1]), h


@case("gru_regressor", "rnn", ["series"], save_as=("script", "export"), expected_failures={
    # the scripted GRU sizes its initial hidden state from the batch; TorchScript -> ExportedProgram bakes it in
    "pt2:torchscript": "guard failed for dynamic dim batch", "aoti:torchscript": "guard failed for dynamic dim batch",
    **TRACE_FIXES_BATCH})
def gru_regressor() -> Any:
    return GRURegressor(), (torch.randn(2, 10, 6),)


# ------------------------------------------------------------------------------------------------- CNNs

class DepthwiseBlock(nn.Module):
    """MobileNetV3-style: depthwise conv, squeeze-excite, pointwise projection, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1),
                                nn.Hardsigmoid())
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.bn(self.dw(x)))
        return x + self.pw(h * self.se(h))


class DepthwiseCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(DepthwiseBlock(16), DepthwiseBlock(16))
        self.head = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(image)).mean((2, 3)))


@case("depthwise_cnn", "cnn", ["image"])
def depthwise_cnn() -> Any:
    return DepthwiseCNN(), (torch.randn(2, 3, 32, 32),)


class UNet(nn.Module):
    """Two levels down, two up: max-pool, bilinear upsampling, a transposed conv, concatenated skips."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU())

        self.d1, self.d2, self.mid = block(3, 8), block(8, 16), block(16, 16)
        self.up2 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.u2, self.u1 = block(32, 8), block(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        s1 = self.d1(image)
        s2 = self.d2(F.max_pool2d(s1, 2))
        m = self.mid(F.max_pool2d(s2, 2))
        h = self.u2(torch.cat([self.up2(m), s2], 1))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.out(self.u1(torch.cat([h, s1], 1)))


@case("unet", "cnn", ["image"], aoti=("exported_program",))
def unet() -> Any:
    return UNet(), (torch.randn(2, 3, 32, 32),)


class AudioConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 8, 9, stride=4, padding=4), nn.BatchNorm1d(8), nn.GELU(),
                                 nn.Conv1d(8, 16, 5, stride=2, padding=2, dilation=1), nn.GELU())
        self.head = nn.Linear(16, 4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(wave).amax(-1))


@case("audio_conv1d", "cnn", ["wave"])
def audio_conv1d() -> Any:
    return AudioConv(), (torch.randn(2, 1, 256),)


# ------------------------------------------------------------------------------ heads and output structure

class TopKHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 20))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = torch.topk(self.body(x).softmax(-1), k=3, dim=-1)
        return values, indices


@case("topk_head", "heads", ["x"])
def topk_head() -> Any:
    return TopKHead(), (torch.randn(2, 12),)


class DictOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(10, 16), nn.Tanh())
        self.cls = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(x)
        logits = self.cls(h)
        return {"logits": logits, "probs": logits.softmax(-1), "embedding": h}


@case("dict_outputs", "structure", ["x"], save_as=("script", "export"))
def dict_outputs() -> Any:
    return DictOutputs(), (torch.randn(2, 10),)


class NestedOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x).relu()
        return h, [self.b(h), h.sum(-1)], {"norm": h.norm(dim=-1), "max": h.amax(-1)}


@case("nested_outputs", "structure", ["x"])
def nested_outputs() -> Any:
    return NestedOutputs(), (torch.randn(2, 6),)


class TwoInputs(nn.Module):
    """An image and a metadata vector, fused late."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.meta_proj = nn.Linear(5, 8)  # named "meta", torch.export.load fails on the saved program
        self.head = nn.Linear(16, 2)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image).flatten(1), self.meta_proj(meta)], -1))


@case("two_inputs", "structure", ["image", "meta"])
def two_inputs() -> Any:
    return TwoInputs(), (torch.randn(2, 3, 16, 16), torch.randn(2, 5))


# ----------------------------------------------------------------------------------- attention and masks

class MaskedMHA(nn.Module):
    """nn.MultiheadAttention with a boolean key-padding mask (True = padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        out, _ = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)
        keep = (~padding).unsqueeze(-1).to(out.dtype)
        return self.head((out * keep).sum(1) / keep.sum(1).clamp(min=1.0))


@case("masked_mha", "attention", ["ids", "padding"], expected_failures=TRACE_FIXES_BATCH, aoti=("exported_program",))
def masked_mha() -> Any:
    return MaskedMHA(), (_ids(), _mask(dtype=torch.int64) == 0)


class TorchTransformer(nn.Module):
    """nn.TransformerEncoder traced under no_grad takes the fused fast path (aten::_transformer_encoder_layer_fwd)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


@case("torch_transformer", "attention", ["ids"], expected_failures=TRACE_FIXES_BATCH)
def torch_transformer() -> Any:
    return TorchTransformer(), (_ids(),)


class CausalDecoder(nn.Module):
    """A hand-written decoder block on scaled_dot_product_attention(is_causal=True), with weight-tied logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.pos = nn.Parameter(torch.randn(64, 32) * 0.02)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.embed(ids) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, 32))
        h = h + self.mlp(self.norm2(h))
        return h @ self.embed.weight.T


@case("causal_decoder", "attention", ["ids"], expected_failures=TRACE_FIXES_BATCH)
def causal_decoder() -> Any:
    return CausalDecoder(), (_ids(),)


# ------------------------------------------------------------------------------ integer and boolean inputs

class BoolGate(nn.Module):
    """A float input gated by a boolean mask input: torch.where on a bool tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, self.lin(x), torch.zeros_like(x)).sum(-1)


@case("bool_gate", "inputs", ["x", "keep"])
def bool_gate() -> Any:
    return BoolGate(), (torch.randn(2, 4, 8), torch.rand(2, 4, 8) > 0.5)


class Int32Bag(nn.Module):
    """int32 token ids (what many tokenizers hand out) into a mean-pooled embedding bag."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids.long()).mean(1))


@case("int32_ids", "inputs", ["ids"])
def int32_ids() -> Any:
    return Int32Bag(), (_ids().to(torch.int32),)


class PositionsFromMask(nn.Module):
    """Position ids computed from the attention mask by cumsum (as transformers do for left padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 16)
        self.pos = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
        h = self.tok(ids) + self.pos(positions)
        return self.head(h * mask.unsqueeze(-1))


@case("positions_from_mask", "inputs", ["ids", "mask"])
def positions_from_mask() -> Any:
    return PositionsFromMask(), (_ids(), _mask())


class Differences(nn.Module):
    """First differences of a signal (torch.diff: aten::diff, which the TorchScript-based exporter lacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(15, 4)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.diff(signal, dim=-1).abs())


@case("diff_signal", "ops", ["signal"], save_as=("script", "export"))
def diff_signal() -> Any:
    return Differences(), (torch.randn(2, 16),)


class MLPMixer(nn.Module):
    """Token mixing by transposes and LayerNorm, channel mixing by MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.tokens = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.channels = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.patch(image).flatten(2).transpose(1, 2)  # b, 16 tokens, 16 channels
        h = h + self.tokens(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.channels(self.norm2(h))
        return self.head(h.mean(1))


@case("mlp_mixer", "cnn", ["image"])
def mlp_mixer() -> Any:
    return MLPMixer(), (torch.randn(2, 3, 16, 16),)


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The case's module (eval mode, seeded weights) and its example inputs."""
    torch.manual_seed(seed)
    module, args = ZOO[name].build()
    return module.eval(), args


# the classes of model issue 14 found hard (they register themselves into ZOO)
import tests.zoo.harder  # noqa: E402,F401
