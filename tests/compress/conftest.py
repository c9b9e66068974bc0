"""Tiny models for the compression tests: a token-in/logits-out stack of plain nn.Linear (pre-norm
blocks with fused qkv / gate_up like models/llama.py), and a tiny random HF LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """Attention-free stand-in: a causal running mean replaces attention, so every projection of a
    Llama layer (qkv_proj, o_proj, gate_up_proj, down_proj) and both norms are present."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.qkv_proj, self.o_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up_proj, self.down_proj = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(self.input_layernorm(h)).chunk(3, -1)
        n = torch.arange(1, h.shape[1] + 1, device=h.device)[:, None]
        mix = torch.cumsum(torch.sigmoid(q * k) * v, dim=1) / n
        h = h + self.o_proj(mix)
        g, u = self.gate_up_proj(self.post_attention_layernorm(h)).chunk(2, -1)
        return h + self.down_proj(F.silu(g) * u)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 64, f: int = 128, n_layers: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f) for _ in range(n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            # Correlated, outlier-heavy activations like real LMs: low-rank embeddings + a few loud
            # channels. That is where GPTQ (correlations) and AWQ (salient channels) beat RTN.
            low = torch.randn(vocab, 8, generator=gen) @ torch.randn(8, d, generator=gen)
            self.embed_tokens.weight.copy_(low + 0.1 * torch.randn(vocab, d, generator=gen))
            self.embed_tokens.weight[:, :4] *= 8
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)
                elif isinstance(m, RMSNorm):
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def token_batches(vocab: int, n: int, t: int, seed: int) -> torch.Tensor:
    """Token ids with structure (a random walk over a small vocabulary window) rather than white noise."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (n, t), generator=gen)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    return (start + steps.cumsum(1)) % vocab


@pytest.fixture
def make_tiny_lm():
    return TinyLM


@pytest.fixture
def tiny_lm() -> TinyLM:
    return TinyLM().eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return token_batches(96, 16, 32, seed=1)


@pytest.fixture
def heldout() -> torch.Tensor:
    return token_batches(96, 8, 32, seed=2)


@pytest.fixture
def hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
        model.model.embed_tokens.weight[:, :4] *= 8
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().float().norm() / b.detach().float().norm())


@pytest.fixture
def err():
    return rel_err


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread avoids OpenMP barrier stalls on a shared 2-core machine
    (seen at 60x slowdowns when another process holds a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
