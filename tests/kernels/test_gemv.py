"""The GEMV kernels compute what their pure-torch references say (fp32, up to summation order), on
every instruction set the CPU offers (AVX2 always, AVX-512 where present)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanformer import kernels as K

needs_kernels = pytest.mark.skipif(not K.available(), reason="GEMV kernels unavailable on this machine")

ROWS = (1, 2, 3, 5, 8)  # each count has its own unrolling / accumulator scheme
# (N, K): tails in both directions (odd N for the AVX-512 row pairs, K not a multiple of 8/16/32, K
# shorter than one vector), plus a realistic shape big enough to run multi-threaded.
SHAPES = [(5, 7), (37, 83), (64, 64), (131, 577), (960, 576)]


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Relative to the output's scale: fp32 accumulation order differs, so elementwise ratios near 0
    are meaningless."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y, ref = y.detach(), ref.detach()
    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    assert err < tol, err


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_builds_where_supported():
    """A broken build must fail CI, not silently fall back: where the CPU and toolchain allow it, the
    extension has to load."""
    problem = K._cpu_problem() or K._toolchain_problem()
    if problem:
        pytest.skip(problem)
    assert K.available()


def test_build_hash_covers_every_kernel_file():
    """Every .cpp / .h beside the kernels is compiled or hashed: an edit to a file the hash missed
    would keep running the stale build cached under the old hash."""
    listed = {p.name for p in (*K._SOURCES, *K._HEADERS)}
    on_disk = {p.name for p in K._DIR.iterdir() if p.suffix in (".cpp", ".h")}
    assert on_disk == listed


@needs_kernels
def test_isa_selection():
    """The best instruction set is the default; asking for a missing one raises and changes nothing."""
    assert K.isas()[0] == "avx2" and K.isa() == K.isas()[-1]
    with pytest.raises(ValueError):
        K.set_isa("sse2")
    if "avx512" not in K.isas():
        with pytest.raises(ValueError):
            K.set_isa("avx512")
        with pytest.raises(RuntimeError):
            K.ext().set_isa("avx512")
    try:
        K.set_isa("avx2")
        assert K.isa() == "avx2"
    finally:
        K.set_isa(None)
    assert K.isa() == K.isas()[-1]


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_f32(m, n, k, with_bias, isa):
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    close(K.ext().linear_f32(x, w, b), K.ref_linear_f32(x, w, b))


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_q8(m, n, k, with_bias, isa):
    x = torch.randn(m, k)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s, b = torch.rand(n) * 0.01 + 1e-3, torch.randn(n) if with_bias else None
    close(K.ext().linear_q8(x, wq, s, b), K.ref_linear_q8(x, wq, s, b))


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(
    "n,k,group", [(37, 96, 32), (64, 83, 32), (131, 577, 64), (960, 576, 32), (40, 100, 20)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_q8_grouped(m, n, k, group, with_bias, isa):
    """One scale per `group` columns (GGUF Q8_0: 32): partial last groups (83, 577), groups that are not
    whole 8-wide vectors (20), a multi-threaded shape."""
    x = torch.randn(m, k)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n, -(-k // group)) * 0.01 + 1e-3
    b = torch.randn(n) if with_bias else None
    close(K.ext().linear_q8(x, wq, s, b, group), K.ref_linear_q8(x, wq, s, b, group))
    close(K.linear_q8(x, wq, s, b, group), K.ref_linear_q8(x, wq, s, b, group))


@needs_kernels
@pytest.mark.parametrize("n,k,group", [(37, 83, 32), (64, 256, 64), (48, 200, 40), (300, 576, 32)])
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_int4_matches_torch(n, k, group, bf16):
    """Bit-identical to the torch formula (bf16 scales make every product exact), fp32 or rounded to
    bf16 like .to(bfloat16); rows may be longer than ceil(K/2) bytes (Int4Linear pads to groups)."""
    codes = torch.randint(0, 16, (n, -(-k // group) * group), dtype=torch.uint8)
    g = codes.shape[1] // group
    s = (torch.rand(n, g) * 0.02 + 1e-3).bfloat16().float()
    z = torch.randn(n, g) * 0.01
    wq = K.pack_int4(codes)
    ref = K.dequant_int4(wq, s, z, group, k)
    out = K.ext().dequant_q4(wq, s, z, group, k, bf16)
    assert out.shape == (n, k) and torch.equal(out, ref.to(out.dtype))
    assert torch.equal(K.ext().dequant_q4(wq[5:9], s[5:9], z[5:9], group, k), ref[5:9])


@needs_kernels
@pytest.mark.parametrize("group", [0, 32, 20])
@pytest.mark.parametrize("bf16", [False, True])
def test_dequant_int8_matches_torch(group, bf16):
    n, k = 45, 100
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) if group == 0 else torch.rand(n, -(-k // group))
    ref = K.dequant_int8(wq, s, group)
    out = K.ext().dequant_q8(wq, s, group, bf16)
    assert torch.equal(out, ref.to(out.dtype))


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(
    "n,k,group",
    [
        (37, 83, 32),
        (64, 256, 32),
        (64, 64, 64),
        (131, 577, 64),
        (960, 576, 128),
        (40, 768, 256),
        (48, 200, 40),
        (7, 14, 2),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_q4(m, n, k, group, with_bias, isa):
    """AVX2's decoders: group 32 (paired 16-byte groups), 64/128/256 (fast), 40 and 2 (generic); odd K
    (padded nibble); partial last groups (577 % 64, 576 % 128); rows that are not whole 32-byte blocks.
    AVX-512: odd group counts at 32, groups that end inside a 16-byte chunk (40, 2), odd N."""
    x = torch.randn(m, k) + 0.3  # non-zero mean so the zero-point term matters
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    g = -(-k // group)
    s, z = torch.rand(n, g) * 0.02 + 1e-3, torch.randn(n, g) * 0.01
    wq, b = K.pack_int4(codes), torch.randn(n) if with_bias else None
    close(K.ext().linear_q4(x, wq, s, z, group, b), K.ref_linear_q4(x, wq, s, z, group, b))


@needs_kernels
def test_q4_convention_matches_compress_quantizer(isa):
    """w = (code - 8) * scale + zero, low nibble = even column: the bytes of compress.kernels."""
    from leanformer.compress import kernels as CK

    w = torch.randn(64, 256) + 0.5
    s, z = CK.int4_params(w, 64)
    codes = CK.int4_codes(w, s, z, 64)
    wq = CK.pack_nibbles(codes)
    assert torch.equal(wq, K.pack_int4(codes))
    x = torch.randn(2, 256)
    close(K.ext().linear_q4(x, wq, s, z, 64), x @ CK.int4_dequant(codes, s, z, 64).t())


@needs_kernels
@pytest.mark.parametrize("k", [7, 100, 576, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_f32_rows_equal_one_row_calls(k, with_bias, isa):
    """A row's fp32 result does not depend on how many rows the call has (a speculative verify row of a
    fp32 model or head must equal the plain step's row), bit for bit: one row takes its own loop
    (f32_rows_m1 on AVX-512), which must sum in the same order as the multi-row tiles."""
    x, w = torch.randn(17, k), torch.randn(70, k)
    b = torch.randn(70) if with_bias else None
    one = torch.cat([K.ext().linear_f32(x[i : i + 1], w, b) for i in range(17)])
    for m in (2, 3, 4, 5, 8, 9, 16, 17):
        assert torch.equal(K.ext().linear_f32(x[:m], w, b), one[:m]), m


@needs_kernels
@pytest.mark.parametrize("k", [7, 37, 100, 576, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_equal_f32_of_the_same_values(k, with_bias, dtype, isa):
    """linear_bf16 / linear_f16 widen each weight in registers and run the fp32 loop: bit for bit the
    fp32 GEMV on the weight made fp32, at every row count (1..8, and past 8 in chunks) and K tail, and
    close to a float64 reference."""
    op = K.ext().linear_bf16 if dtype == torch.bfloat16 else K.ext().linear_f16
    x, w = torch.randn(17, k), torch.randn(70, k).to(dtype)
    b = torch.randn(70) if with_bias else None
    for m in (1, 2, 3, 4, 5, 8, 9, 17):
        y = op(x[:m], w, b)
        assert torch.equal(y, K.ext().linear_f32(x[:m], w.float(), b)), m
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    close(y, ref.float())


@needs_kernels
def test_16_bit_kernels_refuse_other_weights():
    with pytest.raises(RuntimeError, match="W must be bfloat16"):
        K.ext().linear_bf16(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="W must be float16"):
        K.ext().linear_f16(torch.randn(1, 8), torch.randn(4, 8).bfloat16())


@needs_kernels
def test_many_rows_and_leading_dims(isa):
    """M > 8 runs in chunks of 8; the wrappers flatten leading dims and keep the input dtype."""
    x, w, b = torch.randn(2, 9, 100), torch.randn(33, 100), torch.randn(33)
    close(K.linear_f32(x, w, b), K.ref_linear_f32(x, w, b))
    wq, s = torch.randint(-127, 128, (33, 100), dtype=torch.int8), torch.rand(33)
    close(K.linear_q8(x, wq, s.bfloat16(), b), K.ref_linear_q8(x, wq, s.bfloat16(), b))
    codes = torch.randint(0, 16, (33, 100), dtype=torch.uint8)
    sc, zc = torch.rand(33, 2), torch.randn(33, 2)
    close(K.linear_q4(x, K.pack_int4(codes), sc, zc, 64), K.ref_linear_q4(x, K.pack_int4(codes), sc, zc, 64))


@needs_kernels
def test_wrappers_keep_autograd():
    """With a gradient needed the wrappers take the torch reference, so backward still works."""
    x, w = torch.randn(2, 16, requires_grad=True), torch.randn(8, 16)
    K.linear_f32(x, w).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, w.sum(0).expand(2, -1))


@needs_kernels
def test_threads_agree(isa):
    """Results must not depend on the thread split (each output is summed by exactly one thread, in
    the same order whichever rows share its task)."""
    n_out = 3070  # two threads get 1535 rows each: a row paired on one thread is alone on two (AVX-512)
    x, w = torch.randn(3, 576), torch.randn(n_out, 576)
    wq, s8 = torch.randint(-127, 128, (n_out, 576), dtype=torch.int8), torch.rand(n_out)
    codes, sc, zc = (
        torch.randint(0, 16, (n_out, 576), dtype=torch.uint8),
        torch.rand(n_out, 18),
        torch.rand(n_out, 18),
    )
    e = K.ext()
    ops = [
        lambda: e.linear_f32(x, w),
        lambda: e.linear_q8(x, wq, s8),
        lambda: e.linear_q8(x[:1], wq, s8),
        lambda: e.linear_q4(x, K.pack_int4(codes), sc, zc, 32),
        lambda: e.linear_q4(x[:1], K.pack_int4(codes), sc, zc, 32),
    ]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [f() for f in ops]
        torch.set_num_threads(2)
        two = [f() for f in ops]
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_kernels
def test_bad_inputs_raise():
    with pytest.raises(RuntimeError):
        K.ext().linear_f32(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError):
        K.ext().linear_q4(
            torch.randn(2, 8), torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 7
        )
    with pytest.raises(RuntimeError):  # group-wise scales of the wrong width
        K.ext().linear_q8(
            torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), None, 32
        )
    with pytest.raises(RuntimeError):
        K.ext().dequant_q4(torch.zeros(4, 3, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 1), 32, 8)
    with pytest.raises(RuntimeError):
        K.ext().dequant_q8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5), 0)


@needs_kernels
def test_fast_linear_swap_keeps_state_and_math():
    from leanformer.kernels.modules import FastLinear, use_fast_linears_
    from leanformer.kernels.packed import PackedLinear

    model = nn.Sequential(
        nn.Linear(72, 40), nn.ReLU(), PackedLinear.from_linear(nn.Linear(40, 24, bias=False))
    )
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x_small, x_big = torch.randn(2, 5, 72), torch.randn(128, 72)
    with torch.no_grad():
        before = model(x_small), model(x_big)
        use_fast_linears_(model)
        after = model(x_small), model(x_big)
    assert isinstance(model[0], FastLinear) and isinstance(model[2], FastLinear)
    assert hasattr(model[2], "packed_weight") and not hasattr(model[0], "packed_weight")
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    for a, b in zip(before, after):
        close(a, b)
    # with autograd on, the torch path runs and gradients flow
    model(x_small).sum().backward()
    assert model[0].weight.grad is not None
    # export (and ONNX's exporter built on it) must record an ordinary linear, not the pybind kernel
    with torch.no_grad():
        exported = torch.export.export(model, (x_small,))
        close(exported.module()(x_small), before[0])


def test_disable_falls_back_to_torch(monkeypatch):
    import leanformer.kernels as lk
    from leanformer.kernels.modules import FastLinear

    lin = FastLinear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(1, 64)
    with torch.no_grad():
        fast = lin(x)
        monkeypatch.setattr(lk, "_ext", lk._ext)  # restored after the test
        monkeypatch.setattr(lk, "_tried", lk._tried)
        lk.disable()
        assert not lk.available()
        torch.testing.assert_close(lin(x), fast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [7, 64, 576, 1001])
def test_rms_norm_matches_torch(k):
    import leanformer.kernels as lk

    if not lk.available():
        pytest.skip("kernels unavailable on this machine")
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(5, k, generator=g) * 3, torch.randn(k, generator=g)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(lk.ext().rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 9])
def test_q4_without_zeros_is_symmetric(m, isa):
    """zeros None (GGUF Q4_0's symmetric blocks): the same as all-zero zero points, through the wrapper,
    the compiled GEMV and the dequantizer."""
    n, k, group = 37, 200, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    wq, scales = K.pack_int4(codes), torch.rand(n, -(-k // group)) + 0.1
    zeros, x = torch.zeros_like(scales), torch.randn(m, k)
    assert torch.equal(K.linear_q4(x, wq, scales, None, group), K.linear_q4(x, wq, scales, zeros, group))
    close(K.linear_q4(x, wq, scales, None, group), K.ref_linear_q4(x, wq, scales, None, group))
    d = K.ext().dequant_q4(wq, scales, None, group, k, False)
    assert torch.equal(d, K.dequant_int4(wq, scales, None, group, k))
