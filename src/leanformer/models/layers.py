"""Layers shared by the model families: norms, rotary embeddings, and the CPU-fast Linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels
from leanformer.errors import LeanformerError


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim); built on the meta device (loading.skeleton) without its normal_ init,
    which has nothing to fill there and cost a 1.1-1.5 s import of torch._dynamo on a process's first
    load (meta-tensor normal_ runs through torch._refs)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            fused = x.is_cpu and self.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            if fused and kernels.available() and not kernels.tracing():
                # one C++ call instead of 6 ops: ~0.6 ms per SmolLM2 token of dispatch (kernels/norm.cpp)
                y = kernels.ext().rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
                return y.view(x.shape)
            # the same arithmetic as HF's LlamaRMSNorm in 6 ops; F.rms_norm dispatches ~20 (casts, copies)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight  # as HF does


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention scaling factor, as HF computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        raise LeanformerError(
            "rope_scaling type 'yarn' is not supported yet; supported: default, linear, llama3"
        )
    raise LeanformerError(f"unknown rope_scaling type {kind!r}; supported: default, linear, llama3")


class Rotary(nn.Module):
    """Rotary position embedding in HF's rotate_half layout, matching HF's float32 arithmetic exactly.

    Decode steps (a few positions) read cos/sin rows from a table of the first positions, grown by
    doubling up to TABLE_POSITIONS (2 MB at head_dim 64) and filled by the same elementwise formula,
    so its rows equal a direct computation bit for bit: one index op instead of ~11 per token (each
    ~5 µs here, as every token streams the weights through the caches). Larger steps and positions past
    the table compute directly, which keeps 128k-context configs from allocating hundreds of MB; so do
    traced / exported forwards (the table's size depends on the positions' values).
    """

    TABLE_POSITIONS = 4096
    TABLE_MAX_ROWS = 64  # steps with more positions (prefill) compute directly

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.spec = (head_dim, theta, scaling)
        self.build()

    def build(self) -> None:
        """(Re)compute inv_freq; the loader calls this after building the model on the meta device.
        Computed on the CPU and moved: arithmetic on meta tensors imports torch._dynamo (~1 s, once)."""
        device = torch.get_default_device()
        with torch.device("cpu"):
            inv_freq, self.attn_factor = rope_inv_freq(*self.spec)
        inv_freq = inv_freq.to(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: torch.Tensor | None = None  # [L, 2, D]: cos, signed sin of positions 0..L-1

    def _apply(self, fn, recurse=True):
        self._table = None  # .to() / .float() may move or change inv_freq
        return super()._apply(fn, recurse)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [..., D] float32 of positions [...] by the formula."""
        freqs = positions[..., None].float() * self.inv_freq  # [..., D/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1) * self.attn_factor
        sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1) * self.attn_factor
        return cos, sin

    def table(self, positions: int) -> torch.Tensor | None:
        """The decode table [L, 2, D] float32 (cos, signed sin of positions 0..L-1, L >= positions), or
        None past TABLE_POSITIONS. Its rows are what forward returns for those positions."""
        if positions > self.TABLE_POSITIONS:
            return None
        table = self._table
        if table is None or table.shape[0] < positions or table.device != self.inv_freq.device:
            size = max(256, 1 << (positions - 1).bit_length())
            cos, sin = self.tables(torch.arange(size, device=self.inv_freq.device))
            table = self._table = torch.stack((cos, sin), dim=-2)
        return table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] → (cos, signed sin), each [(B,) T, 1, D], computed once per step.

        The sin table carries rotate_half's sign (−sin on the first half), so rotating is
        x * cos + swap_halves(x) * sin: three ops on q and k together instead of six on each.
        """
        if positions.numel() <= self.TABLE_MAX_ROWS and not positions.is_cuda and not kernels.tracing():
            table = self.table(int(positions.max()) + 1 if positions.numel() else 0)
            if table is not None:
                rows = table[positions]  # [(B,) T, 2, D]
                return rows[..., 0:1, :].to(dtype), rows[..., 1:2, :].to(dtype)
        cos, sin = self.tables(positions)
        return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] rotated in HF's rotate_half convention; sin is the signed table from Rotary."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with a fused qkv projection and an optional KV cache."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.qkv_proj = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, rope: tuple | None, cache, step) -> torch.Tensor:
        """x [B, T, hidden]; rope = (cos, sin) for this step or None; cache/step from engine.cache."""
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, d)
        qk, v = qkv[:, :, : h + kv], qkv[:, :, h + kv :]
        if rope is not None:  # rotate q and k heads in one go
            qk = apply_rotary(qk, *rope)
        q = qk[:, :, :h].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, h:].transpose(1, 2)  # [B, KV, T, D]
        v = v.transpose(1, 2)
        if cache is None:
            mask, causal = None, True
        else:
            k, v = cache.update(self.layer_idx, step, k, v)
            mask, causal = step.mask, step.is_causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=kv != h)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))
