"""The fused decode step's attention (kernels/decode_attention.h, ``ext().decode_attention``) against a
float64 torch reference: RoPE, the KV-cache write (fp32 and int8 storage) and causal softmax attention for
chained rows of one slot (a speculative verify forward), batched rows of different slots, and mixes."""

from __future__ import annotations

import math

import pytest
import torch

from leanformer import kernels as K

pytestmark = [
    pytest.mark.skipif(not K.available(), reason="leanformer kernels unavailable here"),
    pytest.mark.usefixtures("one_thread"),
]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] * cos + swap_halves(x) * sin (models/layers.Rotary's signed sin table)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], -1) * sin


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """models/kv_cache.py's int8 rows: scale = max|x| / 127 (at least 1e-8 / 127), round half even."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(x / s).to(torch.int8), s


def _written(qkv, cos, sin, cache, slots, pos, H):
    """The cache after the rows' RoPE'd k and v are written at their positions."""
    k, v, ks, vs = (None if t is None else t.clone() for t in cache)
    KV, D = k.shape[1], k.shape[3]
    kn = _rope(qkv[:, H * D : (H + KV) * D].view(-1, KV, D), cos[:, None], sin[:, None])
    vn = qkv[:, (H + KV) * D :].view(-1, KV, D)
    for m, (s, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        if ks is None:
            k[s, :, p], v[s, :, p] = kn[m], vn[m]
        else:
            (k[s, :, p], ks[s, :, p]), (v[s, :, p], vs[s, :, p]) = _quantize(kn[m]), _quantize(vn[m])
    return k, v, ks, vs


def _attention(qkv, cos, sin, cache, slots, pos, H):
    """softmax(q k^T / sqrt(D)) v in float64 per (row, head) over keys 0..pos[m] of the given cache."""
    k, v, ks, vs = cache
    KV, D = k.shape[1], k.shape[3]
    q = _rope(qkv[:, : H * D].view(-1, H, D), cos[:, None], sin[:, None])
    kf = k.double() if ks is None else k.double() * ks.double()
    vf = v.double() if vs is None else v.double() * vs.double()
    out = torch.empty(len(pos), H, D, dtype=torch.float64)
    for m, (s, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        for h in range(H):
            j = h // (H // KV)
            w = torch.softmax(kf[s, j, : p + 1] @ q[m, h].double() / math.sqrt(D), 0)
            out[m, h] = w @ vf[s, j, : p + 1]
    return out.view(len(pos), H * D)


def _case(H, KV, D, slots, pos, int8, seed=0):
    """Random qkv / cos / sin and a cache whose positions past each slot's last row are NaN (fp32) or
    have NaN scales (int8): the kernel must never read them."""
    g = torch.Generator().manual_seed(seed)
    slots, pos = torch.tensor(slots), torch.tensor(pos)
    M, n_slots, max_seq = len(pos), int(slots.max()) + 2, int(pos.max()) + 5
    qkv = torch.randn(M, (H + 2 * KV) * D, generator=g)
    ang = torch.rand(M, D // 2, generator=g) * 6
    cos = torch.cos(ang).repeat(1, 2)
    sin = torch.cat([-torch.sin(ang), torch.sin(ang)], 1)
    k, v = torch.randn(2, n_slots, KV, max_seq, D, generator=g)
    if int8:
        (k, ks), (v, vs) = _quantize(k), _quantize(v)
    else:
        ks = vs = None
    for s in range(n_slots):
        last = int(pos[slots == s].max()) if (slots == s).any() else -1
        for t in (k, v) if not int8 else (ks, vs):
            t[s, :, last + 1 :] = float("nan")
    return qkv, cos, sin, (k, v, ks, vs), slots, pos


def _run(qkv, cos, sin, cache, slots, pos, H):
    k, v, ks, vs = (None if t is None else t.clone() for t in cache)
    out = K.ext().decode_attention(qkv, cos, sin, k, v, ks, vs, slots, pos, H)
    return out, (k, v, ks, vs)


def _check(H, KV, D, slots, pos, int8, seed=0):
    qkv, cos, sin, cache, slots_t, pos_t = _case(H, KV, D, slots, pos, int8, seed)
    out, written = _run(qkv, cos, sin, cache, slots_t, pos_t, H)
    # the cache writes: RoPE in the kernel rounds once less (an FMA), so an int8 code may differ by one
    for got_t, want_t in zip(written, _written(qkv, cos, sin, cache, slots_t, pos_t, H)):
        if got_t is not None:
            atol = 1.0 if got_t.dtype == torch.int8 else 1e-5
            torch.testing.assert_close(got_t.float(), want_t.float(), atol=atol, rtol=1e-5, equal_nan=True)
    want = _attention(qkv, cos, sin, written, slots_t, pos_t, H)  # on the cache the kernel wrote
    assert torch.isfinite(out).all()
    err = (out.double() - want).abs().max().item()
    assert err <= 2e-6 * max(1.0, want.abs().max().item()), err
    return qkv, cos, sin, cache, slots_t, pos_t, out


LAYOUTS = {  # (slots, positions) per row
    "one row": ([0], [37]),
    "chained": ([1] * 5, [29, 30, 31, 32, 33]),  # a verify forward: row m sees keys 0..29+m
    "batched": ([2, 0, 1], [13, 70, 4]),  # one row per slot, slots out of order
    "mixed": ([0, 1, 0, 1, 2], [40, 9, 41, 10, 0]),  # chained rows of two slots interleaved, a first token
    "gap": ([0, 0], [50, 17]),  # two rows of a slot far apart: row 1 must not see keys 18..50
}


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("heads", [(3, 3), (6, 2), (4, 1)], ids=["group1", "group3", "group4"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(layout, heads, int8):
    _check(*heads, 64, *LAYOUTS[layout], int8)


@pytest.mark.parametrize("D", [8, 20, 48, 100, 128])  # 32-column blocks, 8-column rests, scalar tails
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_head_dims(D, int8):
    _check(6, 2, D, *LAYOUTS["mixed"], int8)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_equals_the_row_alone(threads, int8):
    """A query's result depends only on its own keys: each row of a verify forward (chained rows across
    the 256-key ranges) and of a batch is bit for bit the same row decoded alone (on the cache holding
    every row's write), at any thread count."""
    torch.set_num_threads(threads)
    try:
        for slots, pos in (([0] * 6, list(range(253, 259))), ([0, 1, 2], [40, 300, 129])):
            qkv, cos, sin, cache, slots_t, pos_t, out = _check(9, 3, 64, slots, pos, int8)
            _, written = _run(qkv, cos, sin, cache, slots_t, pos_t, 9)
            for m in range(len(pos)):
                one = slice(m, m + 1)
                alone, _ = _run(qkv[one], cos[one], sin[one], written, slots_t[one], pos_t[one], 9)
                assert torch.equal(alone[0], out[m])
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("layout", ["one row", "chained", "mixed"])
def test_long_contexts_in_key_ranges(layout, int8):
    """Contexts over 256 keys run as several key ranges (tasks) merged per query, on 1 or 2 threads."""
    slots, pos = LAYOUTS[layout]
    long = [p + 300 for p in pos]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            _check(9, 3, 64, slots, long, int8)
            _check(2, 1, 20, slots, long, int8)
        finally:
            torch.set_num_threads(1)


def test_rejects_bad_inputs():
    qkv, cos, sin, (k, v, ks, vs), slots, pos = _case(6, 2, 16, [0], [3], True)
    e = K.ext()
    with pytest.raises(RuntimeError, match="scales"):
        e.decode_attention(qkv, cos, sin, k, v, None, None, slots, pos, 6)
    with pytest.raises(RuntimeError, match="qkv"):
        e.decode_attention(qkv, cos, sin, k, v, ks, vs, slots, pos, 5)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        e.decode_attention(qkv, cos, sin, k, v, ks, vs, slots, pos + 100, 6)
