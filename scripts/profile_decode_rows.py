"""Where a fused decode step's time goes at M rows (speculative verification / batched decode).

    python scripts/profile_decode_rows.py /tmp/h17/smollm2-Q4_0.gguf [--rows 1 2 3 5 9] [--threads 1]
        [--repeats 15] [--position 200] [--kv-dtype float16] [--dequantize] [--act-isa avx2] [--fp32-scales]

Loads a GGUF kept quantized and times, in rounds in one process (medians, ms per call; CPU time of this
thread by default, which preemption on a busy machine does not inflate):
  step      the fused C++ decode step (kernels/decode.cpp DecodeStack.forward) on M chained rows of one
            slot at positions P..P+M-1 (the verify forward's shape), int8 activations
  phases    its parts over all layers, from DecodeStack.profile: norms + residuals, the qkv / o / gate_up /
            down GEMVs (each with its activation quantization and thread fork / join), attention (RoPE,
            cache write, softmax), SiLU
  act quant the 120 block inputs quantized by quantize_act alone (an estimate of the GEMVs' share)
  head      the LM head (Int8Linear, int8 activations) on M rows
`--dequantize`: the GGUF's weights dequantized to fp32 (the fp32 GEMVs; no activation quantization).
`--fp32-scales`: the int4 / int8 modules hold fp32 arrays of their scales instead of fp16 (the layout
before QuantLinear.compact_scales; the fused step then makes its own fp16 copies where it reads them).
Prints /proc/loadavg before and after.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from i8_rows_ab import _ms as _median_ms  # same directory: run as a script
from i8_rows_ab import add_clock_arg, loadavg, use_clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--position", type=int, default=200)
    p.add_argument(
        "--kv-dtype", choices=("float32", "float16"), default="float32", help="the K / V cache's dtype"
    )
    p.add_argument("--dequantize", action="store_true", help="fp32 weights (the fp32 GEMVs)")
    p.add_argument("--act-isa", help="avx2 / avx_vnni / avx512_vnni (default: the best)")
    p.add_argument("--fp32-scales", action="store_true", help="int4 / int8 scales held as fp32 arrays")
    add_clock_arg(p)
    a = p.parse_args()
    use_clock(p, a)

    import leanformer as lf
    from leanformer import kernels
    from leanformer.models.fused import set_decode_activations
    from leanformer.models.huge_pages import huge_zeros

    torch.set_num_threads(a.threads)
    if a.act_isa:
        from leanformer.kernels import cpu

        try:
            cpu.set_act_isa(a.act_isa)
        except ValueError as e:
            raise SystemExit(f"--act-isa: {e}") from None
    model, _ = lf.load(a.model, keep_quantized=not a.dequantize)
    if a.fp32_scales:
        for m in model.modules():
            for name in getattr(m, "HALF_SCALES", ()):
                if m._buffers.get(name) is not None:
                    m._buffers[name] = m._buffers[name].float()
    if not a.dequantize:
        set_decode_activations(model, "int8")
    stack = model._decode_plan.get(model)
    assert stack is not None, "the model does not fuse"
    stack.int8_act = not a.dequantize
    e = kernels.ext()
    args = model.args
    hidden, layers = args.hidden_size, len(model.model.layers)
    attn0 = model.model.layers[0].self_attn
    kv, d = attn0.n_kv_heads, attn0.head_dim
    max_seq = a.position + max(a.rows) + 16
    # random K / V: an untouched torch.zeros buffer maps every page to one zero page (cache-resident reads)
    kvt = getattr(torch, a.kv_dtype)
    # in huge pages, as KVCache lays them out (K0, V0, K1, ...; models/huge_pages.py)
    shape = (1, kv, max_seq, d)
    kvs = huge_zeros(2 * layers, shape, kvt, min_bytes=0) or [
        torch.empty(shape, dtype=kvt) for _ in range(2 * layers)
    ]
    for t in kvs:
        t.copy_(torch.randn(t.shape))
    k, v = kvs[0::2], kvs[1::2]
    head = model.lm_head
    if not a.dequantize:
        head.int8_activations = True
    g = torch.Generator().manual_seed(0)

    linears = []
    for block in model.model.layers if not a.dequantize else []:
        for m in (
            block.self_attn.qkv_proj,
            block.self_attn.o_proj,
            block.mlp.gate_up_proj,
            block.mlp.down_proj,
        ):
            linears.append(m.decode_operands())
    if linears:
        print("block Linears:", sorted({(o[0], tuple(o[1].shape), o[4]) for o in linears}))
        ops = head.decode_operands()
        print("head:", type(head).__name__, ops[0], tuple(ops[1].shape), "group", ops[4])

    def widths():  # each block Linear's input width (int4 / int5: the codes' columns)
        return [ops[1].shape[1] * (2 if ops[0] in ("q4", "q5") else 1) for ops in linears]

    names = ("norms+res", "qkv", "attention", "o", "gate_up", "silu", "down")
    results: dict[int, dict[str, list[float]]] = {m: {} for m in a.rows}
    before = loadavg()
    for _ in range(a.rounds):
        for m in a.rows:
            x = torch.randn(m, hidden, generator=g)
            cos, sin = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
            slots = torch.zeros(m, dtype=torch.long)
            pos = torch.arange(a.position, a.position + m)
            xh = torch.randn(m, hidden, generator=g)
            xq = [torch.randn(m, kk, generator=g) for kk in widths()]
            r = results[m]

            def step(x=x, cos=cos, sin=sin, slots=slots, pos=pos):
                return stack.forward(x, cos, sin, k, v, [], [], slots, pos)

            def quant(
                xq=xq,
            ):  # the activation quantization the 120 block GEMVs do (an estimate: the int8 layout)
                for xx in xq:
                    e.quantize_act(xx)

            r.setdefault("step", []).append(_median_ms(step, a.repeats))
            r.setdefault("head", []).append(_median_ms(lambda xh=xh: head(xh), a.repeats))
            if not a.dequantize:
                r.setdefault("quant", []).append(_median_ms(quant, a.repeats))
            if hasattr(stack, "profile"):
                stack.profile = [0.0] * len(names)
                for _ in range(a.repeats):
                    step()
                for name, ms in zip(names, stack.profile):
                    r.setdefault(name, []).append(ms / a.repeats)
                stack.profile = []
    after = loadavg()
    print(
        f"clock {a.clock}, threads {a.threads}, position {a.position}; loadavg before {before}, after {after}"
    )
    med = {m: {n: statistics.median(t) for n, t in r.items()} for m, r in results.items()}
    cols = [n for n in names if n in med[a.rows[0]]]
    print(
        "| M | step ms | "
        + " | ".join(cols)
        + " | block GEMVs | act quant (est.) | head | step+head | x M=1 | per row |"
    )
    print("|---" * (len(cols) + 8) + "|")
    one = med[a.rows[0]]["step"] + med[a.rows[0]]["head"]
    for m in a.rows:
        r = med[m]
        gemv = sum(r.get(n, 0.0) for n in ("qkv", "o", "gate_up", "down"))
        full = r["step"] + r["head"]
        print(
            f"| {m} | {r['step']:.2f} | "
            + " | ".join(f"{r[n]:.2f}" for n in cols)
            + f" | {gemv:.2f} | {r.get('quant', 0.0):.2f} | {r['head']:.2f} | {full:.2f} | {full / one:.2f} | {full / m:.2f} |"
        )


if __name__ == "__main__":
    with torch.inference_mode():  # as the engine runs (an fp32 head with grad enabled falls back to F.linear)
        main()
