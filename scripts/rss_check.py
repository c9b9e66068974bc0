"""Memory figures for docs/BENCHMARKS.md (issue #12), each measured in a fresh child process.

    python scripts/rss_check.py load MODEL            # load (GGUF kept quantized) + generate 16 tokens:
                                                      # RSS over the runtime (torch, meta device, kernels),
                                                      # the tokenizer measured apart
    PYTHONPATH=OLD/src python scripts/rss_check.py load MODEL   # the same for another checkout
    python scripts/rss_check.py gptq FOLDER OUT N T   # lazy load, GPTQ int4 on N random sequences of T
                                                      # tokens, layer by layer, save to OUT
    python scripts/rss_check.py apply FOLDER RECIPE.json stream|memory N T
                                                      # compress with a recipe file on N random sequences
                                                      # of T tokens, read lazily (stream) or whole

Prints the weights' size, RSS after loading, and the child's peak RSS (VmHWM) at the end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def trimmed_rss() -> float:
    """VmRSS after glibc hands its free heap back (malloc_trim): what the process holds, not what freed
    load-time temporaries left mapped (those pages would otherwise be reused silently, hiding new tensors)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return vm("VmRSS")


def vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, args: list[str]) -> None:
    import torch

    import leanformer as lf
    from leanformer.compress.stream import state_bytes

    if mode == "load":
        import transformers  # noqa: F401  (imported by every load for the tokenizer: runtime, not weights)

        from leanformer import kernels
        from leanformer.formats.gguf import load_gguf_tokenizer
        from leanformer.loading import load_tokenizer

        start = vm("VmRSS")
        with torch.device("meta"):  # torch's meta-device init machinery: ~60 MB of code and tables
            torch.nn.Embedding(8, 8)  # that the first model skeleton loads once, whatever its size
        if kernels.available():
            kernels.ext()
        runtime = trimmed_rss()
        path = Path(args[0])
        tok = load_gguf_tokenizer(path) if path.suffix == ".gguf" else load_tokenizer(path)
        tokenizer = trimmed_rss() - runtime  # measured alone, then freed: the load makes its own
        del tok
        before = trimmed_rss()
        model, tok = lf.load(args[0])
        weights = state_bytes(model) / 2**20
        after_load = trimmed_rss()
        ids = torch.randint(0, model.args.vocab_size, (1, 16)).tolist()[0]
        from leanformer.engine.generate import decode
        from leanformer.engine.sampling import SamplingParams

        for _ in decode(model, [ids], 16, SamplingParams()):  # a generator: one step per item
            pass
        held = trimmed_rss()
        file_mb = path.stat().st_size / 2**20 if path.is_file() else float("nan")
        grown = after_load - before
        print(
            f"file {file_mb:.0f} MB, weights {weights:.0f} MB; RSS: python + torch {start:.0f} MB, "
            f"runtime (meta device, kernels) {runtime:.0f} MB, tokenizer {tokenizer:.0f} MB; after load "
            f"{after_load:.0f} MB = +{grown:.0f} over the runtime (+{grown - tokenizer:.0f} without the "
            f"tokenizer: {(grown - tokenizer) / file_mb:.2f}x the file, {(grown - tokenizer) / weights:.2f}x "
            f"the weights); after generating 16 tokens {held:.0f} MB (+{held - before:.0f} over the runtime, the "
            f"fused step's own tensors included; RSS after malloc_trim), peak {vm('VmHWM'):.0f} MB"
        )
    elif mode == "gptq":
        from leanformer.compress import GPTQ, Int8WeightOnly, apply

        folder, out, n, t = args[0], args[1], int(args[2]), int(args[3])
        model, tok = lf.load(folder, lazy=True)
        calib = torch.randint(0, model.args.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
        apply(model, [GPTQ(bits=4, group_size=32), Int8WeightOnly(targets=["lm_head"], ignore=[])], calib)
        lf.save(model, tok, out, overwrite=True)
        print(
            f"GPTQ {n} x {t} tokens: weights {state_bytes(model) / 2**20:.0f} MB, peak RSS {vm('VmHWM'):.0f} MB"
        )
    elif mode == "apply":
        import json

        from leanformer.compress import apply
        from leanformer.compress.recipe import Recipe

        torch.set_num_threads(1)
        folder, recipe, how, n, t = args[0], Path(args[1]), args[2], int(args[3]), int(args[4])
        stages = Recipe.from_dict(json.loads(recipe.read_text())).stages
        model, _ = lf.load(folder, lazy=how == "stream")
        before = state_bytes(model) / 2**20
        ids = torch.randint(0, model.args.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        apply(model, stages, ids, progress=False)
        print(
            f"{how} {recipe.stem}: weights {before:.0f} -> {state_bytes(model) / 2**20:.0f} MB, "
            f"peak RSS {vm('VmHWM'):.0f} MB, {time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(subprocess.call([sys.executable, __file__, "--child", *sys.argv[1:]]))
