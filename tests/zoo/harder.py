"""Zoo cases for the classes of model issue 14 found hard (registered into `tests.zoo.models.ZOO` on import).

- PyTorch's fused transformer fast paths in traced archives: a masked `nn.TransformerEncoder` (the nested-tensor
  path) and a masked `nn.Transformer` encoder-decoder;
- operators the TorchScript-based exporter lacks: Llama-style rotary embeddings with `torch.polar` (complex
  values), a Whisper-style front end (unfold, `torch.fft.rfft`, `torch.diff`), an FNet/GFNet spectral mixer
  (fft, rfft, irfft with a complex filter);
- mixture of experts: a Mixtral-style block (top-k routing, per-expert `torch.where` + `index_add_`), and the
  "loop over the experts that got tokens" formulation, which a trace bakes in and portq refuses;
- an ExportedProgram that `torch.export.load` cannot read: it calls a custom grouped-GEMM operator from a
  library the worker does not load (built in a fresh process, where the library is registered);
- a dynamically quantized model (`quantize_dynamic` on Linear + LSTM), traced and as a pickled module.

The model classes are plain torch; the unit tests of the rewrites (tests/tasks/formats, tests/tasks/sources)
build the same ones.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo.models import TRACE_FIXES_BATCH, VOCAB, case

FAST_PATHS = "fused-transformer"
MISSING_OPS = "exporter-missing-ops"
MOE = "mixture-of-experts"
FLOAT_NOTE = "float equivalent of a dynamically quantized model"


def padding_mask(lengths: list[int], t: int) -> torch.Tensor:
    """(B, T) bool, True at padded positions (right padding)."""
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------------- fused transformer fast paths

class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder with a key padding mask: traced under no_grad, the nested-tensor fast path
    (_nested_tensor_from_mask -> _transformer_encoder_layer_fwd x N -> to_padded_tensor)."""

    def __init__(self, d: int = 32, layers: int = 2, norm_first: bool = False, activation: str = "relu") -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           activation=activation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor with norm_first warns
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=pad)


@case("encoder_padding_mask", FAST_PATHS, ["x", "pad"], notes={"torchscript": "rewrote .*_nested_tensor_from_mask"},
      expected_failures=TRACE_FIXES_BATCH)
def encoder_padding_mask() -> Any:
    return MaskedEncoder(), (torch.randn(2, 7, 32), padding_mask([7, 4], 7))


class MaskedSeq2Seq(nn.Module):
    """nn.Transformer encoder-decoder: causal target mask, source and memory key padding masks."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.t = nn.Transformer(d, 4, 2, 2, 2 * d, dropout=0.0, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        causal = torch.triu(torch.full((tgt.size(1), tgt.size(1)), float("-inf")), diagonal=1)
        return self.t(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)


# torch.export refuses nn.Transformer's mask checks (data-dependent), so users send it traced
@case("seq2seq_transformer", FAST_PATHS, ["src", "tgt", "pad"], save_as=("trace",),
      notes={"torchscript": "rewrote .*_transformer_encoder_layer_fwd"})
def seq2seq_transformer() -> Any:
    return MaskedSeq2Seq(), (torch.randn(2, 7, 32), torch.randn(2, 5, 32), padding_mask([7, 3], 7))


# ------------------------------------------------------------------------ operators the TorchScript exporter lacks

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaBlock(nn.Module):
    """Meta-Llama style: RMSNorm, rotary embeddings by torch.polar + view_as_complex, grouped-query attention,
    SwiGLU, a causal mask by torch.triu."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, d // heads
        self.wq, self.wo = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.attn_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)

    def rope(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.rope(self.wq(h).view(b, t, self.h, self.hd), freqs_cis)
        k = self.rope(self.wk(h).view(b, t, self.kvh, self.hd), freqs_cis)
        v = self.wv(h).view(b, t, self.kvh, self.hd)
        k = torch.repeat_interleave(k, self.h // self.kvh, dim=2)
        v = torch.repeat_interleave(v, self.h // self.kvh, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd) + mask
        out = (F.softmax(scores.float(), dim=-1).type_as(q) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.wo(out)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PolarLlama(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([LlamaBlock(d, heads) for _ in range(layers)])
        self.norm = RMSNorm(d)
        self.out = nn.Linear(d, VOCAB, bias=False)
        self.hd = d // heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        freqs = 1.0 / (10000.0 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        angles = torch.outer(torch.arange(t).float(), freqs)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # complex64 (T, hd/2)
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x, freqs_cis, mask)
        return self.out(self.norm(x))


@case("llama_polar_rope", MISSING_OPS, ["tokens"], notes={"torchscript": "lowered .* complex aten::polar"},
      expected_failures={
          # torchlib has no complex tensors, and the TorchScript-based exporter would fix the program's batch size
          # (a static .pt2 converts by the torchscript route, its complex values rewritten as an archive's are)
          "onnx:exported_program": "complex-valued aten::unsqueeze: the dynamo exporter translates no complex",
          **TRACE_FIXES_BATCH})
def llama_polar_rope() -> Any:
    return PolarLlama(), (torch.randint(0, VOCAB, (2, 7)),)


class WhisperFrontEnd(nn.Module):
    """Whisper style, on raw audio: frames by unfold, a Hann window, a torch.fft.rfft power spectrum, mel matrix,
    log10 with a dynamic-range clamp, a torch.diff delta feature, conv1d x2 + GELU, sinusoidal positions and one
    pre-norm attention block."""

    def __init__(self, n_fft: int = 64, hop: int = 32, n_mels: int = 16, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n_fft, self.hop, self.h = n_fft, hop, heads
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("mel", torch.rand(n_mels, n_fft // 2 + 1) / n_fft)
        self.conv1 = nn.Conv1d(2 * n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.ln1, self.ln2, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("inv_timescales", torch.exp(-math.log(10000) / (d // 2 - 1) * torch.arange(d // 2)))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio.unfold(-1, self.n_fft, self.hop) * self.window  # (B, F, n_fft)
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2
        log_spec = torch.clamp(power @ self.mel.T, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        log_spec = (log_spec + 4.0) / 4.0
        delta = torch.diff(log_spec, dim=1, prepend=log_spec[:, :1])
        feats = torch.cat((log_spec, delta), dim=-1).transpose(1, 2)
        x = F.gelu(self.conv2(F.gelu(self.conv1(feats)))).transpose(1, 2)
        t = x.shape[1]
        st = torch.arange(t).float()[:, None] * self.inv_timescales[None, :]
        x = x + torch.cat((st.sin(), st.cos()), dim=1)
        b, _, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.ln_post(x)


@case("whisper_frontend", MISSING_OPS, ["audio"], expected_failures=TRACE_FIXES_BATCH)
def whisper_frontend() -> Any:
    return WhisperFrontEnd(), (torch.randn(2, 32 * 15 + 64),)


class SpectralMixer(nn.Module):
    """FNet / GFNet token mixing: the real part of a 2-D FFT, rfft -> a learned complex filter -> irfft, and
    second differences along time."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.filt = nn.Parameter(torch.randn(d, 2) * 0.5)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        t = x.shape[1]
        fnet = torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real
        spec = torch.fft.rfft(x, dim=1, norm="ortho") * torch.view_as_complex(self.filt)
        gf = torch.fft.irfft(spec, n=t, dim=1, norm="ortho")
        d2 = torch.diff(x, n=2, dim=1, append=x[:, -2:])
        return self.norm(self.lin(fnet + gf) + d2)


@case("fnet_spectral", MISSING_OPS, ["x"], notes={"torchscript": "lowered .* complex aten::fft_"})
def fnet_spectral() -> Any:
    return SpectralMixer(), (torch.randn(2, 10, 16),)


# ------------------------------------------------------------------------------------------ mixture of experts

class Expert(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """The Mixtral block as Hugging Face writes it: router -> softmax -> top-2 -> renormalise -> per expert
    torch.where(one_hot mask) to gather its tokens, run it, index_add_ the weighted result back."""

    def __init__(self, d: int = 32, hidden: int = 64, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.e, self.k = experts, k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList([Expert(d, hidden) for _ in range(experts)])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x.reshape(-1, x.shape[-1])
        logits = self.gate(h)
        weights, selected = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        return h, logits, weights, F.one_hot(selected, num_classes=self.e).permute(2, 1, 0)  # (experts, k, tokens)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logits, weights, mask = self.route(x)
        out = torch.zeros_like(h)
        for i in range(self.e):
            idx, top = torch.where(mask[i])
            y = self.experts[i](h[top]) * weights[top, idx, None]
            out.index_add_(0, top, y.to(h.dtype))
        return out.reshape(x.shape), logits


class HitExpertsMoE(SparseMoE):
    """The newer Hugging Face loop: only over the experts that got tokens. The loop's length depends on the data,
    so torch.export refuses it and torch.jit.trace unrolls it for the tracing example's experts."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logits, weights, mask = self.route(x)
        out = torch.zeros_like(h)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            idx, top = torch.where(mask[e].squeeze(0))
            out.index_add_(0, top, (self.experts[e](h[top]) * weights[top, idx, None]).to(h.dtype))
        return out.reshape(x.shape), logits


class TinyMixtral(nn.Module):
    def __init__(self, moe: type[SparseMoE] = SparseMoE, d: int = 32, layers: int = 2, experts: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.norms = nn.ModuleList([RMSNorm(d) for _ in range(layers)])
        self.moes = nn.ModuleList([moe(d, experts=experts) for _ in range(layers)])
        self.out = nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for norm, moe in zip(self.norms, self.moes):
            y, _ = moe(norm(x))
            x = x + y
        return self.out(x)


@case("mixtral_moe", MOE, ["tokens"], expected_failures=TRACE_FIXES_BATCH)
def mixtral_moe() -> Any:
    return TinyMixtral(), (torch.randint(0, VOCAB, (2, 7)),)


@case("moe_hit_experts", MOE, ["tokens"], save_as=("trace",),
      refused=r"traced through a loop over a data-dependent tensor \(aten::unbind of the result of aten::nonzero")
def moe_hit_experts() -> Any:
    return TinyMixtral(HitExpertsMoE, layers=1, experts=8), (torch.randint(0, VOCAB, (2, 2)),)


class GroupedGemmMoE(SparseMoE):
    """A MoE block whose experts run as one grouped GEMM through a custom operator (as megablocks-style kernels
    do): the .pt2 calls `zoo_kernels.grouped_gemm`, which only the kernel library registers."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.reshape(-1, x.shape[-1])
        logits = self.gate(h)
        weights, selected = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        dense = torch.zeros_like(logits).scatter(1, selected, weights)  # (tokens, experts)
        gate = torch.ops.zoo_kernels.grouped_gemm(h, torch.stack([e.w1.weight for e in self.experts]))
        up = torch.ops.zoo_kernels.grouped_gemm(h, torch.stack([e.w3.weight for e in self.experts]))
        y = torch.einsum("eth,edh->etd", F.silu(gate) * up, torch.stack([e.w2.weight for e in self.experts]))
        return (y * dense.T[..., None]).sum(0).reshape(x.shape), logits


def _register_grouped_gemm() -> None:
    """The kernel library's operator (a plain einsum here): registered only in the process that builds the case."""
    try:
        torch.ops.zoo_kernels.grouped_gemm  # noqa: B018  (already registered in this process)
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("zoo_kernels::grouped_gemm", mutates_args=())
    def grouped_gemm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("td,ehd->eth", h, w)

    @grouped_gemm.register_fake
    def _(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return h.new_empty(w.shape[0], h.shape[0], w.shape[1])


@case("pt2_custom_kernel", MOE, ["tokens"], save_as=("export",), save_in_subprocess=True,
      refused=r"node '\w+' calls custom operator torch\.ops\.zoo_kernels\.grouped_gemm\.default .*saved with torch "
              r"2\.\d+.* \(re-export without the custom op")
def pt2_custom_kernel() -> Any:
    _register_grouped_gemm()
    return TinyMixtral(GroupedGemmMoE, layers=1), (torch.randint(0, VOCAB, (2, 7)),)


# ---------------------------------------------------------------------------------- dynamically quantized

class Tagger(nn.Module):
    """Linear front end -> 2-layer LSTM -> Linear head."""

    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(torch.relu(self.inp(x)))
        return self.head(y)


def quantized_tagger() -> nn.Module:
    """quantize_dynamic(Tagger): int8 weights in Linear and LSTM, activations quantized at run time."""
    return torch.ao.quantization.quantize_dynamic(Tagger().eval(), {nn.Linear, nn.LSTM}, dtype=torch.qint8)


@case("dynamic_quant_lstm", "quantized", ["x"], save_as=("trace", "pickle"),
      notes={"torchscript": FLOAT_NOTE, "pickled_module": FLOAT_NOTE})
def dynamic_quant_lstm() -> Any:
    return quantized_tagger(), (torch.randn(2, 6, 8),)
