"""Two builds of the kernel extension in ONE process: the fused decode step's attention phase
(DecodeStack.profile) at 1 and 8 rows, every row its own slot (issues #16, #17; BENCHMARKS session 12).

    python scripts/attention_ab.py OLD.so NEW.so --model /tmp/h17/smollm2-Q4_0.gguf [--position 200]
        [--kv fp32|fp16] [--rounds 15] [--threads 2]

Random K/V caches of the model's shape; 5 steps per round and build, rounds interleaved; prints the
median attention milliseconds per step and new / old.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from i8_rows_ab import build_stack, load_so  # same directory: run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--model", required=True)
    p.add_argument("--position", type=int, default=200)
    p.add_argument("--kv", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import leanformer as lf

    torch.set_num_threads(a.threads)
    from leanformer.kernels import cpu

    print(f"CPU: {cpu.cpu_info()['model']}")  # figures name the CPU they come from
    exts = {"old": load_so(a.old), "new": load_so(a.new)}
    model, _ = lf.load(a.model, keep_quantized=True)
    stacks = {k: build_stack(e, model) for k, e in exts.items()}
    at0 = model.model.layers[0].self_attn
    kv, d, layers = at0.n_kv_heads, at0.head_dim, len(model.model.layers)
    dtype = torch.float16 if a.kv == "fp16" else torch.float32
    for m in (1, 8):
        cache = [[torch.randn(m, kv, a.position + 32, d).to(dtype) for _ in range(layers)] for _ in range(2)]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, model.args.hidden_size, generator=g)
        cos, sin = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
        slots, pos = torch.arange(m), torch.full((m,), a.position)
        ms: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(a.rounds):
            for name in ("old", "new") if r % 2 else ("new", "old"):
                st = stacks[name]
                st.profile = [0.0] * 7
                for _ in range(5):
                    st.forward(x, cos, sin, cache[0], cache[1], [], [], slots, pos)
                ms[name].append(st.profile[2] / 5)  # phase 2: attention
        o, n = statistics.median(ms["old"]), statistics.median(ms["new"])
        print(
            f"{m} rows, position {a.position}, {a.kv} KV: attention old {o:.3f} ms, new {n:.3f} ms, new / old {n / o:.3f}"
        )


if __name__ == "__main__":
    main()
