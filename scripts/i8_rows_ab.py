"""Two builds of the kernel extension in ONE process, old vs new, at M activation rows (issue #16/#17).

    python scripts/i8_rows_ab.py OLD.so NEW.so [--model /tmp/h17/smollm2-Q4_0.gguf] [--rows 1 2 3 5 8 9]
        [--repeats 9] [--rounds 3] [--threads 1] [--position 200] [--blocks q4|q4z|q8] [--dequantize]
        [--kv-dtype float16] [--paged] [--isa avx2] [--act-isa avx2]

OLD.so / NEW.so: built extensions (~/.cache/leanformer/kernels/<hash>/leanformer_gemv_<hash>.so; the
hash of a source tree is what `leanformer.kernels` builds into). Timed call by call in lockstep (old,
new, then new, old, ...): this VM's speed drifts by tens of percent within seconds, so blocks of calls
one build after the other compared different machines; new / old is the median of the paired calls'
ratios (ms: medians per call):
  gemv   the 120 block Linears of SmolLM2-135M (random codes, group 32; --blocks q4: int4 without zero
         points as GGUF Q4_0, q4z: with zero points as Q4_1, q8: int8 as Q8_0) + the 49152 x 576 int8
         group-32 head, each through linear_q4_i8 / linear_q8_i8
  step   with --model: the fused decode step (DecodeStack) built from the GGUF's kept-quantized
         modules by each build, M chained rows of one slot at positions P..P+M-1, from token ids to
         logits as the engine runs it (DecodeStack.forward_tokens: the embedding, the layers, the final
         norm and the head as this build's DecodeLinear)
  --dequantize  the GGUF's weights as fp32 (linear_f32 GEMVs), the fp32 embedding and head
Prints each as ms and new / old, the step's verify cost (M rows vs 1 row), and /proc/loadavg.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import time
from pathlib import Path

import torch

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def add_clock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="cpu (default): this thread's CPU time, which a busy machine's preemption does not inflate "
        "(one thread only); wall: elapsed time",
    )  # fmt: skip


def use_clock(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.clock == "cpu":
        if a.threads != 1:
            p.error("--clock cpu counts the calling thread only: use --threads 1 or --clock wall")
        CLOCK[0] = time.thread_time


def load_so(path: str):
    if not Path(path).is_file():
        raise SystemExit(
            f"{path}: no such kernel library (a built .so, e.g. ~/.cache/leanformer/kernels/<hash>/)"
        )
    name = Path(path).stem
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


CLOCK = [time.perf_counter]


def _ms(fn, repeats: int) -> float:
    """The median ms of `repeats` calls of fn (after one warm-up call)."""
    fn()
    ts = []
    clock = CLOCK[0]
    for _ in range(repeats):
        t = clock()
        fn()
        ts.append(clock() - t)
    return statistics.median(ts) * 1e3


def _paired_ms(fns: dict, repeats: int) -> dict[str, list[float]]:
    """{name: [ms per call]} for the callables in `fns`, one call of each in turn (the order alternating)."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    clock, order = CLOCK[0], list(fns)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            t = clock()
            fns[name]()
            ts[name].append((clock() - t) * 1e3)
    return ts


def chain_weights(m: int, g: torch.Generator, blocks: str = "q4") -> tuple[list[tuple], tuple]:
    """Random operands of a SmolLM2-shaped chain of block GEMVs ([(x, codes, scales, zeros)] or int8
    [(x, w8, scales, None)]) and the int8 head (x, w, scales), made once per round and shared by both
    builds: with a copy each, where each copy's pages lay made an A/A run read 0.97x / 1.06x."""
    calls = []
    for n, k in LAYER * 30:
        s = torch.rand(n, k // 32, generator=g) * 0.02
        x = torch.randn(m, k, generator=g)
        if blocks == "q8":
            calls.append((x, torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), s, None))
            continue
        wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        z = torch.randn(n, k // 32, generator=g) * 0.01 if blocks == "q4z" else None
        calls.append((x, wq, s, z))
    hw = torch.randint(-128, 128, (49152, 576), dtype=torch.int8, generator=g)
    hs = torch.rand(49152, 18, generator=g) * 0.01
    return calls, (torch.randn(m, 576, generator=g), hw, hs)


def gemv_chain(e, weights: tuple[list[tuple], tuple], blocks: str = "q4"):
    calls, (xh, hw, hs) = weights

    def run_blocks():
        for x, w, s, z in calls:
            if blocks == "q8":
                e.linear_q8_i8(x, w, s, None, 32)
            else:
                e.linear_q4_i8(x, w, s, z, 32, None)

    return run_blocks, lambda: e.linear_q8_i8(xh, hw, hs, None, 32)


def decode_linear(e, mod):
    """kernels' DecodeLinear of this build for a quantized Linear, or an fp32 one (its weight)."""
    if not hasattr(mod, "decode_operands"):
        return e.DecodeLinear("f32", mod.weight.detach().contiguous())
    kind, codes, scales, zeros, group, k_padded, *lut = mod.decode_operands()
    return e.DecodeLinear(kind, codes, scales, zeros, None, None, group, k_padded, *lut)


def build_stack(e, model):
    stack = e.DecodeStack()
    for block in model.model.layers:
        lins = []
        for mod in (
            block.self_attn.qkv_proj,
            block.self_attn.o_proj,
            block.mlp.gate_up_proj,
            block.mlp.down_proj,
        ):
            lins.append(decode_linear(e, mod))
        at = block.self_attn
        stack.add(
            block.input_layernorm.weight.detach(), block.input_layernorm.eps, lins[0], lins[1],
            block.post_attention_layernorm.weight.detach(), block.post_attention_layernorm.eps, lins[2], lins[3],
            at.n_heads, at.n_kv_heads, at.head_dim,
        )  # fmt: skip
    stack.int8_act = True
    # ids to logits in the step, as the engine runs it (models/fused.py _ends): the embedding (fp32, or
    # a GGUF's int8 table), the final norm and the head, this build's DecodeLinear
    norm, emb, head = model.model.norm, model.model.embed_tokens, model.lm_head
    if isinstance(emb, torch.nn.Embedding):
        table = (emb.weight.detach(), None, 0)
    else:
        ops = emb.source().decode_operands()
        table = (ops[1], ops[2], ops[4])
    stack.set_ends(
        *table, norm.weight.detach(), norm.eps, decode_linear(e, head), hasattr(head, "int8_activations")
    )
    return stack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 8, 9])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--position", type=int, default=200)
    p.add_argument("--no-gemv", action="store_true", help="time only the fused step")
    p.add_argument(
        "--paged", action="store_true", help="the K / V as a paged pool (16-token blocks, shuffled)"
    )
    p.add_argument(
        "--kv-dtype", choices=("float32", "float16"), default="float32", help="the K / V cache's dtype"
    )
    p.add_argument("--dequantize", action="store_true", help="--model's weights as fp32 (implies --no-gemv)")
    p.add_argument("--blocks", choices=("q4", "q4z", "q8"), default="q4", help="the block GEMVs' weights")
    p.add_argument(
        "--act-isa",
        default=None,
        help="avx2 / avx_vnni / avx512_vnni: the int8-activation kernels' ISA in both builds (default: the CPU's best)",
    )
    p.add_argument(
        "--isa", choices=("avx2", "avx512"), default=None,
        help="the fp32-activation kernels' and the step attention's ISA in both builds (default: the CPU's best)",
    )  # fmt: skip
    add_clock_arg(p)
    a = p.parse_args()
    use_clock(p, a)
    torch.set_num_threads(a.threads)
    exts = {"old": load_so(a.old), "new": load_so(a.new)}
    for e in exts.values():
        if a.act_isa:
            e.set_act_isa(a.act_isa)
        if a.isa:
            e.set_isa(a.isa)
    model = None
    if a.model:
        import leanformer as lf
        from leanformer.models.huge_pages import huge_zeros

        model, _ = lf.load(a.model, keep_quantized=not a.dequantize)
        a.no_gemv = a.no_gemv or a.dequantize
        stacks = {k: build_stack(e, model) for k, e in exts.items()}
        at0 = model.model.layers[0].self_attn
        kv, d, layers = at0.n_kv_heads, at0.head_dim, len(model.model.layers)
        # random keys and values: an untouched torch.zeros buffer maps every page to the kernel's one
        # zero page, so attention would read cache-resident data (2,000 keys: ~3x faster than real K/V)
        # in huge pages, as KVCache lays them out (K0, V0, K1, ...; models/huge_pages.py); --paged: pools
        # of 16-token blocks [blocks + 1, KV, 16, D], the sequence's blocks in shuffled order
        keys = a.position + max(a.rows) + 16
        nblocks = -(-keys // 16)
        shape = (nblocks + 1, kv, 16, d) if a.paged else (1, kv, keys, d)
        kvt = getattr(torch, a.kv_dtype)
        kvs = huge_zeros(2 * layers, shape, kvt, min_bytes=0) or [
            torch.empty(shape, dtype=kvt) for _ in range(2 * layers)
        ]
        for t in kvs:
            t.copy_(torch.randn(shape))
        cache = [kvs[0::2], kvs[1::2]]
        table = torch.randperm(nblocks, generator=torch.Generator().manual_seed(1))
        s_ = torch.arange(keys)
        # pool row of key s of head j: (block * KV + j) * 16 + s % 16 -> read [KV, keys]
        read1 = (table[s_ // 16][None, :] * kv + torch.arange(kv)[:, None]) * 16 + s_ % 16
    t: dict[tuple[str, str, int], list[float]] = {}
    before = loadavg()
    for _ in range(a.rounds):
        for m in a.rows:
            fns: dict[str, dict] = {"blocks": {}, "head": {}, "step+head": {}}
            chain = None if a.no_gemv else chain_weights(m, torch.Generator().manual_seed(m), a.blocks)
            for name, e in exts.items():
                g = torch.Generator().manual_seed(m)
                if chain is not None:
                    fns["blocks"][name], fns["head"][name] = gemv_chain(e, chain, a.blocks)
                if model is not None:
                    cs = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
                    sl, pos = torch.zeros(m, dtype=torch.long), torch.arange(a.position, a.position + m)
                    st = stacks[name]

                    rw = None
                    if a.paged:  # every row reads the sequence's keys; row m writes its position's row
                        rw = read1[None].expand(m, -1, -1).contiguous(), read1[:, pos].T.contiguous()

                    def step(st=st, cs=cs, sl=sl, pos=pos, rw=rw, m=m):
                        ka = (cache[0], cache[1], [], [], sl, pos, *(rw or ()))
                        ids = torch.arange(m) * 1009 % model.args.vocab_size
                        return st.forward_tokens(ids, cs[0], cs[1], *ka)

                    fns["step+head"][name] = step
            for what, pair in fns.items():
                if pair:
                    for name, ms in _paired_ms(pair, a.repeats).items():
                        t.setdefault((what, name, m), []).extend(ms)
    after = loadavg()
    print(f"clock {a.clock}, threads {a.threads}; loadavg before {before}, after {after}")
    print("| what | M | old ms | new ms | new / old (paired calls) | old xM=1 | new xM=1 |")
    print("|---|---|---|---|---|---|---|")
    for what in ("blocks", "head", "step+head"):
        for m in a.rows:
            if (what, "old", m) not in t:
                continue
            o, n = (statistics.median(t[(what, k, m)]) for k in ("old", "new"))
            ratio = statistics.median(y / x for x, y in zip(t[(what, "old", m)], t[(what, "new", m)]))
            o1 = statistics.median(t[(what, "old", a.rows[0])])
            n1 = statistics.median(t[(what, "new", a.rows[0])])
            print(f"| {what} | {m} | {o:.2f} | {n:.2f} | {ratio:.3f} | {o / o1:.2f} | {n / n1:.2f} |")


if __name__ == "__main__":
    main()
