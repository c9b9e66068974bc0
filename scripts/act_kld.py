"""Quality of the fused decode step's int8 activations against its fp32 activations on the same model
(issue #17: "KLD vs the fp32-activation path"): every position of wikitext windows fed as a decode step,
so the fused step runs, once per activation mode, on this CPU's int8-activation instruction set.

    python scripts/act_kld.py /tmp/h17/smollm2-Q4_0.gguf [--tokens 2048] [--window 256]
        [--data ../shared/data/wikitext-2-raw/wiki.test.raw]

Prints KLD(fp32-activation logits || int8-activation logits) averaged over positions, top-1 agreement,
and the perplexity of each (tokens 1..W-1 of every window, each window from an empty cache).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def logprobs(model, ids: list[int], window: int) -> torch.Tensor:
    """[n_windows * window, V] log-softmax of each position's decode-step logits."""
    from leanformer.models.kv_cache import KVCache

    out = []
    slots = torch.tensor([0])
    with torch.inference_mode():
        for w0 in range(0, len(ids) - window + 1, window):
            cache = KVCache.for_model(model, 1, window + 1)
            for i in range(window):
                logits = model(torch.tensor([[ids[w0 + i]]]), cache, slots)[:, -1].float()
                cache.advance(slots, 1)
                out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args()

    from leanformer.kernels import cpu
    from leanformer.loading import load
    from leanformer.models.fused import set_decode_activations

    torch.set_num_threads(1)
    model, tok = load(args.model, keep_quantized=True)
    text = Path(args.data).read_text(encoding="utf-8").replace("\r\n", "\n")[:60000]
    ids = tok.encode(text)[: args.tokens]
    w = args.window
    lp = {}
    for act in ("fp32", "int8"):
        set_decode_activations(model, act)
        lp[act] = logprobs(model, ids, w)
    a, b = lp["fp32"], lp["int8"]
    kld = float((a.exp() * (a - b)).sum(-1).mean())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    windows = len(a) // w
    targets = torch.tensor([ids[k * w + i + 1] for k in range(windows) for i in range(w - 1)])

    def ppl(x: torch.Tensor) -> float:
        rows = torch.cat([x[k * w : (k + 1) * w - 1] for k in range(windows)])
        return math.exp(float(-rows.gather(1, targets[:, None]).mean()))

    print(
        f"{cpu.cpu_info()['model']}, int8-activation ISA {cpu.act_isa()}: {len(a)} positions; "
        f"KLD(fp32 act || int8 act) {kld:.5f}, top-1 agreement {agree:.4f}; "
        f"PPL fp32 act {ppl(a):.3f}, int8 act {ppl(b):.3f}"
    )


if __name__ == "__main__":
    main()
