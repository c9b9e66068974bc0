"""BERT-family encoders: BERT / MiniLM, RoBERTa, XLM-RoBERTa, DistilBERT — one definition, flags for
the differences (position ids, token types, classifier head) — plus sentence-transformers pooling.

Parameter names are ours but close to HF's; `sanitize` maps both BERT and DistilBERT naming onto them and
fuses q/k/v into one `qkv` matmul (one larger GEMM is faster on a CPU than three small ones). It is
idempotent, so a state dict saved from our model loads through the same path.
Settings that HF's config.json does not carry (sentence-transformers' pooling, normalization and sequence
limit; a trained probe's labels) live in `config["leanformer"]["encoder"]`; pruned attention heads in HF's
own `pruned_heads` key (layer → original head indices). So a saved model rebuilds with the same structure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels
from leanformer.errors import LeanformerError
from leanformer.kernels.h16 import H16Act, H16Linear
from leanformer.kernels.packed import packed_ok
from leanformer.models.bert_attention import LongAttention, long_attention, lookup, position_ids
from leanformer.models.bert_weights import encoder_extras, sanitize  # noqa: F401 (the family contract)
from leanformer.models.layers import embedding

ARCHITECTURES = tuple(
    f"{family}{kind}"
    for family in ("Bert", "Roberta", "XLMRoberta", "DistilBert")
    for kind in ("Model", "ForSequenceClassification", "ForMaskedLM")  # MaskedLM: encoder only, head dropped
)
_FAMILY = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert"}
_ACTS = {  # name → (function, oneDNN post-op (attr, algorithm) that computes the same inside the matmul)
    "gelu": (F.gelu, ("gelu", "none")),
    "gelu_new": (lambda x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
    "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
    "gelu_fast": (lambda x: F.gelu(x, approximate="tanh"), ("gelu", "tanh")),
    "relu": (F.relu, ("relu", "")),
    "silu": (F.silu, None),
    "swish": (F.silu, None),
}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")  # sentence-transformers' names


@dataclass
class ModelArgs:
    family: str  # "bert" | "roberta" | "distilbert"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type embedding (DistilBERT)
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # head pruning: layer → removed heads, as indices into the original heads (HF's `pruned_heads`)
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)
    # FFN channel pruning (encoders/prune_encoder.py): one width per layer; None = intermediate_size everywhere
    intermediate_sizes: list[int] | None = None
    head: str | None = None  # classifier head kind: "bert" | "roberta" | "distilbert"; None = bare encoder
    num_labels: int = 0
    id2label: dict[int, str] = field(default_factory=dict)
    pooling: list[str] = field(default_factory=lambda: ["mean"])
    normalize: bool = False
    max_seq_length: int | None = None  # sentence-transformers' limit, tighter than the position table
    probe_labels: list[str] = field(default_factory=list)  # a linear probe on the embedding (train_probe)

    @property
    def heads_per_layer(self) -> list[int]:
        h = self.num_attention_heads
        return [h - len(self.pruned_heads.get(i, ())) for i in range(self.num_hidden_layers)]

    def ffn_size(self, layer: int) -> int:
        return self.intermediate_sizes[layer] if self.intermediate_sizes else self.intermediate_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_length(self) -> int:
        """Longest input in tokens: RoBERTa spends pad_token_id + 1 position slots before position 0."""
        limit = self.max_position_embeddings - (self.pad_token_id + 1 if self.family == "roberta" else 0)
        return min(limit, self.max_seq_length or limit)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        family = _FAMILY.get(cfg.get("model_type", ""))
        arch = (cfg.get("architectures") or [""])[0]
        if family is None or (arch and arch not in ARCHITECTURES):
            raise LeanformerError(
                f"unsupported encoder {arch or cfg.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise LeanformerError(f"position_embedding_type {cfg['position_embedding_type']!r} unsupported")
        if family == "distilbert":  # DistilBERT spells everything differently
            names = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads"}
            cfg = {names.get(k, k): v for k, v in cfg.items()}
            cfg |= {"intermediate_size": cfg["hidden_dim"], "hidden_act": cfg.get("activation", "gelu")}
            cfg |= {"type_vocab_size": 0, "layer_norm_eps": 1e-12}
        extra = (cfg.get("leanformer") or {}).get("encoder") or {}
        heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        pruned = {int(k): sorted(int(h) for h in v) for k, v in (cfg.get("pruned_heads") or {}).items() if v}
        # transformers omits id2label for the default two labels
        n_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
        id2label = {i: f"LABEL_{i}" for i in range(n_labels)}
        id2label |= {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
        head = family if arch.endswith("ForSequenceClassification") else None
        if cfg.get("hidden_act", "gelu") not in _ACTS:
            raise LeanformerError(
                f"activation {cfg['hidden_act']!r} unsupported; supported: {', '.join(_ACTS)}"
            )
        sizes = cfg.get("intermediate_sizes")
        if sizes is not None and (
            not isinstance(sizes, list)
            or len(sizes) != layers
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in sizes)
        ):
            raise LeanformerError(f"intermediate_sizes must list one positive width per layer ({layers})")
        pooling = extra.get("pooling") or ["mean"]
        if any(p not in POOLING_MODES for p in pooling):
            raise LeanformerError(f"pooling {pooling} not supported; supported: {', '.join(POOLING_MODES)}")
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"),
            pad_token_id=cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else 0,
            pruned_heads=pruned,
            intermediate_sizes=list(sizes) if sizes else None,
            head=head,
            num_labels=len(id2label) if head else 0,
            id2label=id2label if head else {},
            pooling=list(pooling),
            normalize=bool(extra.get("normalize", False)),
            max_seq_length=extra.get("max_seq_length"),
            probe_labels=list(extra.get("probe_labels") or []) if not head else [],
        )


class Embeddings(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        self.word_embeddings = embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = embedding(a.max_position_embeddings, a.hidden_size)
        if a.type_vocab_size:
            self.token_type_embeddings = embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None, long=None, mask=None):
        """ids [B, T] → [B, T, hidden]. Rows longer than the position table need `long` (a LongAttention):
        its `positions` rule reads the table past its end (models/bert_attention.py); mask [B, T] or None."""
        if self.a.family == "roberta":  # fairseq: pad_id + 1 + index for real tokens, pad_id for pads
            real = ids.ne(self.a.pad_token_id).int()
            pos = (torch.cumsum(real, dim=1) * real).long() + self.a.pad_token_id
        else:
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
        # past the table only outside graph capture (exporters see the plain lookup: no data-dependent branch)
        if not kernels.tracing() and int(pos.max()) >= self.a.max_position_embeddings:
            pos_emb = self._extended(ids, pos, long, mask)
        else:
            pos_emb = self.position_embeddings(pos)
        x = self.word_embeddings(ids) + pos_emb
        if self.a.type_vocab_size:
            tt = self.token_type_embeddings
            x = x + (tt.weight[0] if token_type_ids is None else tt(token_type_ids))
        return _norm_(self.LayerNorm, x)  # x: the sum above, ours to overwrite

    def _extended(self, ids, pos, long: LongAttention | None, mask) -> torch.Tensor:
        """Position vectors [B, T, hidden] for rows that run past the table (interpolated or repeated)."""
        first = self.a.pad_token_id + 1 if self.a.family == "roberta" else 0  # RoBERTa's table offset
        if long is None:
            raise LeanformerError(
                f"input of {ids.shape[1]} tokens is longer than the model's "
                f"{self.a.max_position_embeddings - first} positions: "
                "truncate it, or pass attention options (positions='interpolate' or 'repeat')"
            )
        table = self.position_embeddings.weight[first:]  # [P, hidden]
        real = torch.ones_like(ids) if mask is None else mask
        index = position_ids((pos - first).clamp(min=0), real.sum(1), table.shape[0], long.positions)
        out = lookup(table, index)
        if first:  # RoBERTa's pads keep the pad position's vector
            out = torch.where(
                pos[..., None] < first, self.position_embeddings.weight[self.a.pad_token_id], out
            )
        return out


def _linear(mod: nn.Linear, x: torch.Tensor, act=None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(mod(x)) or residual + mod(x); x [N, in] → [N, out].

    When the loader packed the Linear for oneDNN (kernels/packed.PackedLinear) and no gradient is needed,
    the activation / residual add run inside the matmul as post-ops: one pass over the output instead of two.
    Int8Dynamic Linears (compress/quant.py) do the same in their own epilogue (GELU erf form and residual).
    """
    if isinstance(mod, H16Linear) and not kernels.hooked(mod) and (act is None or act[1] == ("gelu", "none")):
        return mod.fused(
            x, gelu=act is not None, residual=residual
        )  # fp16 matmul + epilogue (kernels/h16.py)
    packed = getattr(mod, "packed_weight", None)
    w = getattr(mod, "weight", None)  # quantized Linears may hold none
    if packed is not None and w is not None and w.dtype == torch.bfloat16 and _mixed_ok(x, residual):
        return _linear_bf16(mod, packed, x, act, residual)
    # hooks (calibration) must see the call
    if (
        packed is not None
        and packed_ok(x, mod.weight)
        and not kernels.hooked(mod)
        and (act is None or act[1] is not None)
    ):
        bias = None if mod.bias is None else mod.bias.detach()
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
        attr, algo = act[1] if act is not None else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algo)
    epilogue = getattr(mod, "forward_epilogue", None)  # Int8DynamicLinear: rescale/GELU/residual fused
    if epilogue is not None and not kernels.hooked(mod) and (act is None or act[1] == ("gelu", "none")):
        return epilogue(x, gelu=act is not None, residual=residual)
    if w is not None and w.dtype == torch.bfloat16 and x.dtype != w.dtype:  # bf16 Linear, fp32 x, autograd
        x = x.to(w.dtype)
    y = mod(x)
    return (act[0](y) if act is not None else y) if residual is None else residual + y


def _mixed_ok(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """A bf16-packed Linear in an fp32 model (encoders/build.py, dtype bfloat16): fp32 activations in,
    or the bf16 output of the previous matmul with an fp32 residual; inference only."""
    return (
        (x.dtype == torch.float32 or (residual is not None and residual.dtype == torch.float32))
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and not kernels.tracing()
    )


def _linear_bf16(mod: nn.Linear, packed, x, act, residual) -> torch.Tensor:
    """The matmul (and a fused activation) in bf16, the rest in fp32: x cast to bf16 (a [N, in] pass,
    small beside the matmul); with an activation the output stays bf16 (the next Linear takes it as it
    is), else it comes back as fp32 with the fp32 residual added."""
    xb = x.to(torch.bfloat16)
    # hooks see the call; an activation the oneDNN call cannot fuse runs after it
    if kernels.hooked(mod) or (act is not None and act[1] is None):
        y = mod(xb).float()
        y = act[0](y) if act is not None else y
    else:
        bias = None if mod.bias is None else mod.bias.detach()
        attr, algo = act[1] if act is not None else ("none", "")
        y = torch.ops.mkldnn._linear_pointwise(xb, packed, bias, attr, [], algo)
        if act is not None:
            return y
        y = y.float()
    return y if residual is None else y.add_(residual)


def _layer_norm_c(norm: nn.LayerNorm, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(y (+ residual)) written over y [N, hidden] by kernels/layer_norm.cpp (one pass)."""
    w = None if norm.weight is None else norm.weight.detach()
    b = None if norm.bias is None else norm.bias.detach()
    return kernels.ext().layer_norm_(y, w, b, norm.eps, residual)


def _fused_norm_ok(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether kernels/layer_norm.cpp may normalize x in place: CPU fp32 inference, plain LayerNorm."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and type(norm) is nn.LayerNorm
        and not kernels.hooked(norm)
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
        and (norm.weight is None or norm.weight.dtype == torch.float32)
        and not kernels.tracing()
        and kernels.available()
    )


def _norm_(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for an x nothing else holds (a matmul's or a sum's fresh output): on CPU fp32 inference
    in place, in one C++ pass (kernels/layer_norm.cpp; torch's allocates a new [N, hidden] each time)."""
    if _fused_norm_ok(norm, x) and x.is_contiguous():
        return _layer_norm_c(norm, x.view(-1, x.shape[-1])).view(x.shape)
    return norm(x)


def _linear_add_norm(mod: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm):
    """norm(residual + mod(x)), x [N, in] → [N, hidden]. The residual add runs inside the matmul (oneDNN
    post-op, Int8Dynamic's epilogue) or, for a plain nn.Linear, inside the C++ LayerNorm pass."""
    plain = (
        isinstance(mod, nn.Linear)
        and getattr(mod, "packed_weight", None) is None
        and getattr(mod, "forward_epilogue", None) is None
        and not kernels.hooked(mod)
    )
    if plain and _fused_norm_ok(norm, x) and residual.dtype == torch.float32:
        y = mod(x)  # a fresh [N, hidden]
        if y.is_contiguous() and y.shape == residual.shape:
            return _layer_norm_c(norm, y, residual)
        return norm(residual + y)
    return _norm_(norm, _linear(mod, x, residual=residual))


class Layer(nn.Module):
    """Post-LayerNorm Transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, a: ModelArgs, heads: int, ffn: int | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.act = heads, a.head_dim, _ACTS[a.hidden_act]
        inner = heads * a.head_dim
        with warnings.catch_warnings():  # every head pruned: empty q/k/v/o weights, nothing to initialize
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.qkv = nn.Linear(a.hidden_size, 3 * inner)  # rows: [q heads | k heads | v heads]
            self.attn_out = nn.Linear(inner, a.hidden_size)
        self.attn_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        ffn = ffn or a.intermediate_size  # FFN channels (fewer after encoders/prune_encoder.py)
        self.ffn_in = nn.Linear(a.hidden_size, ffn)
        self.ffn_out = nn.Linear(ffn, a.hidden_size)
        self.ffn_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, head_mask: torch.Tensor | None = None, long=None
    ):
        """x [B, T, hidden]; mask [B, 1, 1, T] bool (True = attend) or None; head_mask [heads] scales heads;
        long: a LongAttention (local / LSH attention) or None (dense)."""
        return self.step(x, mask, head_mask, long)[0]

    def step(self, x, mask, head_mask=None, long=None, x16: H16Act | None = None):
        """forward, taking and giving the fp16 copy of x that a float16 encoder's matmuls read (x16: None
        when there is none): → (x [B, T, hidden], its H16Act or None)."""
        b, t, hidden = x.shape
        x = x.reshape(b * t, hidden)  # the matmuls see [B*T, features]
        x16 = None if x16 is None else H16Act(x16.data, x16.absmax, (b * t,))
        if self.heads == 0:  # every head pruned: only the output projection's bias remains
            x, x16 = _norm_(self.attn_norm, x + self.attn_out.bias), None
        else:
            x, x16 = self._attention_block(x, x16, b, t, mask, head_mask, long)
        if self._h16_ffn():  # the GELU output stays fp16 between the two fp16 matmuls (kernels/h16.py)
            g = self.ffn_in.to_h16(x if x16 is None else x16, gelu=True)
            done = self.ffn_out.fused_norm(g, x, self.ffn_norm)  # + residual, LayerNorm, fp16 copy: one call
            if done is not None:
                return done[0].view(b, t, hidden), done[1]
            y = self.ffn_out.fused(g)
            x = (
                _layer_norm_c(self.ffn_norm, y, x)
                if _fused_norm_ok(self.ffn_norm, y)
                else self.ffn_norm(x + y)
            )
        else:
            x = _linear_add_norm(self.ffn_out, _linear(self.ffn_in, x, self.act), x, self.ffn_norm)
        return x.view(b, t, hidden), None

    def _attention_block(self, x, x16, b: int, t: int, mask, head_mask, long):
        """(attn_norm(x + attn_out(attention(qkv(x)))), its fp16 copy or None), x [B*T, hidden] and x16
        its fp16 copy (H16Act) or None."""
        h, d = self.heads, self.head_dim
        dense = long is None or long.kind == "dense"
        if dense and head_mask is None and self._h16_attention():
            # q/k/v, attention and its output stay fp16 between the fp16 matmuls (kernels/attention_h16*.cpp)
            qkv = self.qkv.to_h16(x if x16 is None else x16)
            if isinstance(qkv, H16Act):
                key_mask = None if mask is None else mask.reshape(b, t)
                o = kernels.ext().attention_h16(qkv.data, b, h, key_mask, qkv.absmax, True)
                if o is not None:
                    o = H16Act(o[0], o[1], (b * t,))
                    done = self.attn_out.fused_norm(o, x, self.attn_norm)
                    if done is not None:
                        return done
                    return _norm_(self.attn_norm, self.attn_out.fused(o, residual=x)), None
                qkv = qkv.data.float()  # a chain could overflow: the fp32 kernel on the same values
        else:
            qkv = _linear(self.qkv, x)
        q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        if dense:
            o = _attention(q, k, v, mask)  # [B, H, T, D]
        else:
            key_mask = None if mask is None else mask.reshape(b, t)
            o = long_attention(q, k, v, key_mask, long, lambda *qkv: _attention(*qkv, mask))
        del q, k, v, qkv  # the [B*T, 3*H*D] qkv output goes back to the allocator before the FFN's
        if head_mask is not None:
            o = o * head_mask.view(1, h, 1, 1)
        o = o.transpose(1, 2).reshape(b * t, h * d)  # a view: the kernel wrote [B, T, H, D]
        return _linear_add_norm(self.attn_out, o, x, self.attn_norm), None

    def _h16_attention(self) -> bool:
        return (
            isinstance(self.qkv, H16Linear)
            and isinstance(self.attn_out, H16Linear)
            and self.head_dim % 16 == 0
            and self.qkv.runs_kernel()
            and self.attn_out.runs_kernel()
        )

    def _h16_ffn(self) -> bool:
        return (
            isinstance(self.ffn_in, H16Linear)
            and isinstance(self.ffn_out, H16Linear)
            and self.act[1] == ("gelu", "none")
            and self.ffn_in.runs_kernel()
            and self.ffn_out.runs_kernel()
        )


SHORT_SEQ = 64  # without the fused kernel: up to this length two batched matmuls beat torch's SDPA on CPU


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention, q/k/v [B, H, T, D], mask [B, 1, 1, T] bool (True = attend) or None.

    CPU fp32 inference takes the fused C++ kernel (kernels/attention.cpp) at every length: measured
    (2 threads, AVX-512) 2.7x faster than SDPA at [16, 12, 256, 32] (5.8 vs 15.6 ms) and 1.9x faster than
    matmul + softmax + matmul at [32, 12, 16, 32]. It writes [B, T, H, D], the layout the output
    projection reads, so the transpose returned here is undone by the caller for free.
    Without the kernels: for sentence-length inputs (STS-B averages ~16 tokens) CPU SDPA's flash kernel
    is dominated by per-block overhead (measured [32, 12, 16, 32]: 0.68 ms vs 0.20 ms for matmul +
    softmax + matmul, same values to 1e-6); from ~64 tokens on SDPA wins (at 256: 12.8 vs 45.7 ms).
    Exporters and autograd always see SDPA (one graph for every length)."""
    t = q.shape[-2]
    if kernels.tracing() or q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (q.shape[0], 1, 1, t)))
        and kernels.available()
    ):
        key_mask = None if mask is None else mask.reshape(q.shape[0], t)
        return kernels.ext().attention(q, k, v, key_mask).transpose(1, 2)
    if t > SHORT_SEQ:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # [B, H, T, T]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


class Head(nn.Module):
    """Sequence-classification head on the first token: dense → tanh (BERT, RoBERTa) / relu (DistilBERT) → out."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)
        self.out = nn.Linear(a.hidden_size, a.num_labels)
        self.act = torch.relu if a.head == "distilbert" else torch.tanh

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(hidden[:, 0])))  # [B, hidden] → [B, labels]


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.layers = nn.ModuleList(
            Layer(args, h, args.ffn_size(i)) for i, h in enumerate(args.heads_per_layer)
        )
        self.head = Head(args) if args.head else None
        labels = len(args.probe_labels)
        self.probe = nn.Linear(args.hidden_size * len(args.pooling), labels) if labels else None
        self.config: dict = {}  # the HF-style config dict; the loader sets it

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, head_mask=None, attention=None
    ) -> torch.Tensor:
        """input_ids [B, T], attention_mask [B, T] (1 = token) → last hidden state [B, T, hidden].

        head_mask: optional list of per-layer [heads] tensors multiplying each head's output (importance).
        attention: a models.bert_attention.LongAttention (local / LSH attention, positions past the table).
        """
        x = self.embeddings(input_ids, token_type_ids, attention, attention_mask)
        # No mask when nothing is padded lets SDPA take its fastest kernel (common after length sorting);
        # graph capture (ONNX export, torch.compile) must keep the mask: the test depends on data.
        mask = None
        tracing = kernels.tracing()
        if attention_mask is not None and (tracing or not bool(attention_mask.all())):
            mask = attention_mask.bool()[:, None, None, :]
        x16 = None  # the fp16 copy of x a float16 encoder's layer hands the next (Layer.step)
        for i, layer in enumerate(self.layers):
            layer_heads = None if head_mask is None else head_mask[i]
            if tracing or kernels.hooked(layer):  # hooks see the call, graphs record the module
                x, x16 = layer(x, mask, layer_heads, attention), None
            else:
                x, x16 = layer.step(x, mask, layer_heads, attention, x16)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool | None = None):
        """hidden [B, T, hidden] → sentence embeddings [B, hidden × len(pooling)], sentence-transformers' way."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        m = attention_mask[..., None].to(hidden.dtype)  # [B, T, 1]
        total, count = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
        parts = {
            "cls": lambda: hidden[
                torch.arange(hidden.shape[0]), attention_mask.int().argmax(1)
            ],  # first token
            "max": lambda: hidden.masked_fill(m == 0, float("-inf")).amax(1),
            "mean": lambda: total / count,
            "mean_sqrt_len_tokens": lambda: total / count.sqrt(),
        }
        out = torch.cat([parts[p]() for p in self.args.pooling], dim=-1)
        normalize = self.args.normalize if normalize is None else normalize
        return F.normalize(out, p=2, dim=-1) if normalize else out

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, normalize=None, attention=None):
        """Token ids → pooled (and, per the folder's Normalize module, L2-normalized) embeddings [B, D]."""
        hidden = self(input_ids, attention_mask, token_type_ids, attention=attention)
        return self.pool(hidden, attention_mask, normalize)

    def logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """[B, labels] from the classification head, or from the linear probe on the sentence embedding."""
        if self.head is None and self.probe is None:
            raise LeanformerError(
                "model has no classification head and no probe: run `leanformer train-probe`"
            )
        hidden = self(input_ids, attention_mask, token_type_ids)
        return self.head(hidden) if self.head is not None else self.probe(self.pool(hidden, attention_mask))
