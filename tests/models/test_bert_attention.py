"""Local (sliding-window) and LSH attention for encoders (models/bert_attention.py) against dense SDPA
with the exact key sets as masks, and long inputs through the model (positions past the table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import embed
from leanformer.errors import LeanformerError
from leanformer.models.bert_attention import (
    LongAttention,
    local_attention,
    lookup,
    lsh_attention,
    lsh_rounds,
    position_ids,
)
from tests.encoders.helpers import SENTENCES, need_minilm, tiny_encoder_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(b=2, h=3, t=50, d=8, pad_from=37):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, pad_from:] = False  # row 1 is padded
    return q, k, v, mask


def _close_on_real(got, want, mask, tol=2e-6):
    real = mask[:, None, :, None].expand_as(want)  # padded queries' outputs are don't-care
    assert (got - want)[real].abs().max() < tol


@pytest.mark.parametrize("window", [25, 26, 50, 64, 200])
def test_local_with_blocks_covering_the_input_equals_dense(window):
    """Two blocks or fewer: each query's own and neighbouring blocks hold every key."""
    q, k, v, mask = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    _close_on_real(local_attention(q, k, v, mask, window), want, mask)


def _block_band(t: int, window: int) -> torch.Tensor:
    """[T, T] reference mask of block-local attention: key j is seen by query i when their blocks of
    `window` are the same or adjacent."""
    block = torch.arange(t) // window
    return (block[:, None] - block[None, :]).abs() <= 1


@pytest.mark.parametrize("window", [1, 5, 8, 17])
def test_local_equals_dense_with_the_block_band_mask(window):
    q, k, v, mask = _qkv()
    allowed = _block_band(q.shape[2], window) & mask[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    _close_on_real(local_attention(q, k, v, mask, window), want, mask)
    i = torch.arange(q.shape[2])
    assert _block_band(q.shape[2], window)[(i[:, None] - i[None, :]).abs() <= window].all()  # ⊇ window


def test_local_is_finite_where_a_block_is_all_padding():
    q, k, v, mask = _qkv(pad_from=10)  # row 1: blocks 3.. of 4 tokens hold padding only
    out = local_attention(q, k, v, mask, 4)
    assert torch.isfinite(out).all()


def test_lsh_one_chunk_equals_dense():
    q, k, v, mask = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    _close_on_real(lsh_attention(q, k, v, mask, 64, 1, 0), want, mask)


@pytest.mark.parametrize("hashes", [1, 2, 3])
def test_lsh_equals_dense_over_the_union_of_its_rounds(hashes):
    """Every key counted once: SDPA with the mask 'key's chunk within one of the query's, in any round'."""
    q, k, v, mask = _qkv()
    allowed = torch.zeros(2, 3, 50, 50, dtype=torch.bool)
    for _, _, cq, ck in lsh_rounds(q, k, mask, 8, hashes, seed=3):
        allowed |= (cq[..., :, None] - ck[..., None, :]).abs() <= 1
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & mask[:, None, None, :])
    got = lsh_attention(q, k, v, mask, 8, hashes, seed=3)
    _close_on_real(got, want, mask, tol=1e-5)
    assert torch.equal(got, lsh_attention(q, k, v, mask, 8, hashes, seed=3))  # seeded: repeatable


def test_positions_past_the_table():
    table = torch.randn(8, 4)
    pos = torch.arange(12)[None].expand(2, 12)
    fits = position_ids(pos[:1, :6], torch.tensor([6]), 8, "interpolate")
    assert torch.equal(lookup(table, fits), table[:6][None])  # a row that fits is unchanged
    idx = position_ids(pos, torch.tensor([12, 8]), 8, "interpolate")
    assert idx[0, -1] == 7 and idx[0, 0] == 0 and torch.equal(idx[1, :8], torch.arange(8.0))
    assert torch.allclose(lookup(table, torch.tensor([[0.5]])), (table[0] + table[1])[None, None] / 2)
    assert torch.equal(
        position_ids(pos, torch.tensor([12, 12]), 8, "repeat")[0], (torch.arange(12) % 8).float()
    )


def test_options_are_checked():
    for bad, fragment in [
        (dict(attention="sparse"), "attention 'sparse' unknown"),
        (dict(attention="local", window=0), "window must be a whole number"),
        (dict(attention="lsh", hashes=1.5), "hashes must be a whole number"),
        (dict(attention="local", positions="wrap"), "positions 'wrap' unknown"),
        (dict(attention="local", windows=3), "unknown attention option 'windows'"),
    ]:
        with pytest.raises(LeanformerError, match=fragment):
            LongAttention.make(**bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_encoder_dir(tmp_path_factory.mktemp("enc"), "BertModel", pooling=["mean"], normalize=True)
    return load_encoder(folder, fast=False)


def test_embed_local_and_lsh_covering_the_input_equal_dense(tiny):
    model, tok = tiny
    dense = embed(model, tok, SENTENCES)
    np.testing.assert_allclose(embed(model, tok, SENTENCES, attention="local", window=40), dense, atol=1e-6)
    np.testing.assert_allclose(
        embed(model, tok, SENTENCES, attention="lsh", bucket_size=40), dense, atol=1e-6
    )
    small = embed(model, tok, SENTENCES, attention="local", window=2)  # a real change, still unit vectors
    assert np.abs(small - dense).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1, atol=1e-5)


def test_embed_past_the_position_table(tiny):
    model, tok = tiny  # 40 positions, sentence-transformers' limit 32
    long_text = " ".join(SENTENCES * 4)  # ~100 tokens
    with pytest.warns(UserWarning, match="truncated to the model's maximum of 32"):
        embed(model, tok, [long_text])
    for positions in ("interpolate", "repeat"):
        e = embed(
            model,
            tok,
            [long_text, SENTENCES[0]],
            max_length=120,
            attention="local",
            window=16,
            positions=positions,
        )
        assert np.isfinite(e).all()
        # a short text in the same batch embeds as it does alone, with plain dense attention
        alone = embed(model, tok, [SENTENCES[0]], attention="local", window=16)
        np.testing.assert_allclose(e[1], alone[0], atol=1e-5)
    ids = torch.ones(1, 60, dtype=torch.long)
    with pytest.raises(LeanformerError, match="longer than the model's 40 positions"):
        model(ids)


def test_onnx_runner_refuses_long_attention(tiny):
    class Runner:  # duck-typed like export.OrtEncoder: no layers to change
        args = tiny[0].args

    with pytest.raises(LeanformerError, match="torch backend only"):
        embed(Runner(), tiny[1], ["x"], attention="local")


def test_real_minilm_local_and_lsh_covering_equal_dense_at_300_tokens():
    model, tok = load_encoder(need_minilm())
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 22)
    n = 300  # past sentence-transformers' 256, within the 512 positions
    dense = embed(model, tok, [text], max_length=n)
    np.testing.assert_allclose(
        embed(model, tok, [text], max_length=n, attention="local", window=400), dense, atol=2e-6
    )
    got = embed(model, tok, [text], max_length=n, attention="lsh", bucket_size=512, hashes=1)
    np.testing.assert_allclose(got, dense, atol=2e-6)
    local = embed(model, tok, [text], max_length=n, attention="local", window=64)
    assert 0.5 < float((local * dense).sum()) < 0.999  # a window of 64 changes it (measured 0.84)


def test_plain_matmul_fallback_matches_the_flash_kernel():
    """With autograd (or without torch's private flash op) the same attention runs as plain matmuls."""
    q, k, v, mask = _qkv()
    for fn in (lambda *x: local_attention(*x, mask, 8), lambda *x: lsh_attention(*x, mask, 8, 2, 1)):
        flash = fn(q, k, v)
        with torch.enable_grad():
            plain = fn(q.requires_grad_(), k, v).detach()
        q.requires_grad_(False)
        _close_on_real(plain, flash, mask, tol=1e-5)
