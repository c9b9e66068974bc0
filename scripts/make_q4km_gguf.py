"""Re-quantize a GGUF file to llama.cpp's Q4_K_M mix (for memory / speed figures of K-quant files):
Q6_K for the token embedding / output and for attn_v / ffn_down in every other layer, Q4_K for the
other matrices; rows whose width 256 does not divide fall back to Q5_0 (as llama.cpp does) and
norms stay as stored. Uses the K-quant encoders of the test helpers (tests/formats/kquants.py: the
`gguf` package dequantizes K-quants but cannot write them). Run from the repository root:

    python scripts/make_q4km_gguf.py SRC.gguf DST.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ helpers

import gguf  # noqa: E402
from tests.formats.kquants import requantize_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType


def q4_k_m(name: str, shape: tuple[int, ...]) -> Q:
    """llama.cpp's Q4_K_M choice for one matrix (shape [rows, K])."""
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    big = name in ("token_embd.weight", "output.weight") or (
        layer % 2 == 0 and any(k in name for k in ("attn_v", "ffn_down"))
    )
    if shape[-1] % 256:
        return Q.Q5_0 if not big else Q.Q8_0
    return Q.Q6_K if big else Q.Q4_K


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    written = requantize_gguf(src, dst, q4_k_m)
    counts: dict[str, int] = {}
    for t in written.values():
        counts[t] = counts.get(t, 0) + 1
    print(dst, dst.stat().st_size / 2**20, "MB", counts)
