"""Per-call time of the int4 GEMV with 8-bit dq8 scale codes against the same weights with fp32 [N, G]
scales/zeros, at SmolLM2-135M's projection shapes, one activation row, one thread, interleaved, medians
(issue #12). Checks the two give equal outputs bit for bit.

    python scripts/dq8_gemv_ratio.py [--repeats 15] [--calls 400] [--activations int8|fp32] [--old-so PATH]

--old-so: also time the codes through another build of the extension (e.g. the one before the in-kernel
table lookup, ~/.cache/leanformer/kernels/<tag>/leanformer_gemv_<tag>.so), in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

# (out_features, in_features): q / o, k / v, gate / up, down
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _load_so(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--activations", default="int8", choices=["int8", "fp32"])
    p.add_argument("--old-so", default=None)
    p.add_argument("--shapes", default=None, help="N1xK1,N2xK2,... (default: SmolLM2-135M's)")
    a = p.parse_args()

    import torch

    from leanformer.compress import double_quant as DQ
    from leanformer.kernels import ext

    torch.set_num_threads(1)
    mods = {"new": ext()}
    if a.old_so:
        mods["old"] = _load_so(a.old_so)
    fn = "linear_q4_i8" if a.activations == "int8" else "linear_q4"
    print("loadavg before:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    shapes = [tuple(int(v) for v in t.split("x")) for t in a.shapes.split(",")] if a.shapes else SHAPES
    for n, k in shapes:
        gen = torch.Generator().manual_seed(0)
        g = k // a.group
        scales = torch.exp(torch.rand(n, g, generator=gen) * 4.6 - 2.3) * 1e-2
        zeros = (torch.rand(n, g, generator=gen) * 15 - 7) * scales
        sc, zc, ranges = DQ.encode(scales, zeros)
        lut = DQ.lut(ranges)
        s, z = (t.contiguous() for t in DQ.decode(sc, zc, ranges))
        wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        x = torch.randn(1, k, generator=gen)
        cases = {"fp32 arrays": (mods["new"], (x, wq, s, z, a.group, None))}
        for name, m in mods.items():
            cases[f"codes ({name} build)"] = (m, (x, wq, sc, zc, a.group, None, lut))
        outs = [getattr(m, fn)(*args) for m, args in cases.values()]
        same = all(torch.equal(outs[0], o) for o in outs[1:])
        times: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(a.repeats):
            for c, (m, args) in cases.items():
                f = getattr(m, fn)
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    f(*args)
                times[c].append((time.perf_counter() - t0) / a.calls * 1e6)
        base = statistics.median(times["fp32 arrays"])
        row = "  ".join(
            f"{c}: {statistics.median(t):6.2f} us ({statistics.median(t) / base:.3f}x)"
            for c, t in times.items()
        )
        print(f"[{n:4d} x {k:4d}] equal={same}  {row}")
    print("loadavg after:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))


if __name__ == "__main__":
    main()
