"""Test-only reference: llama2.c's run.c forward pass and tokenizer, transcribed to numpy from the format.

Reads the raw .bin with no conversion at all (interleaved-pair RoPE on the raw wq/wk, exactly as run.c
does it), so agreement with `read_llama2c` + an HF-convention Llama checks the q/k row conversion.
Deliberately naive: one token at a time with a KV cache, float32 like run.c.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


class RunC:
    """run.c's Transformer: `forward(token, pos)` returns the logits for the next token."""

    def __init__(self, path: str | Path) -> None:
        blob = Path(path).read_bytes()
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", blob)
        shared, vocab = vocab > 0, abs(vocab)
        self.dim, self.layers, self.heads, self.kv_heads, self.vocab = dim, layers, heads, kv_heads, vocab
        self.head_size = dim // heads
        kv_dim = kv_heads * self.head_size
        w = np.frombuffer(blob, dtype="<f4", offset=28)
        pos = 0

        def take(*shape: int) -> np.ndarray:
            nonlocal pos
            n = int(np.prod(shape))
            out = w[pos : pos + n].reshape(shape)
            pos += n
            return out

        self.emb = take(vocab, dim)
        self.rms_att = take(layers, dim)
        self.wq = take(layers, dim, dim)
        self.wk = take(layers, kv_dim, dim)
        self.wv = take(layers, kv_dim, dim)
        self.wo = take(layers, dim, dim)
        self.rms_ffn = take(layers, dim)
        self.w1 = take(layers, hidden, dim)
        self.w2 = take(layers, dim, hidden)
        self.w3 = take(layers, hidden, dim)
        self.rms_final = take(dim)
        take(seq_len * self.head_size)  # freq_cis_real + freq_cis_imag, unused by run.c
        self.wcls = self.emb if shared else take(vocab, dim)
        self.key_cache = np.zeros((layers, seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros((layers, seq_len, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = np.float32(np.mean(x * x) + 1e-5)
        return weight * (x / np.sqrt(ss))

    def forward(self, token: int, pos: int) -> np.ndarray:
        hs, kv_mul = self.head_size, self.heads // self.kv_heads
        x = self.emb[token].copy()
        for layer in range(self.layers):
            xb = self.rmsnorm(x, self.rms_att[layer])
            q = self.wq[layer] @ xb
            k = self.wk[layer] @ xb
            v = self.wv[layer] @ xb
            for i in range(0, self.dim, 2):  # run.c's RoPE: rotate interleaved pairs (i, i+1)
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                fcr, fci = np.cos(pos * freq), np.sin(pos * freq)
                for vec in (q, k) if i < k.shape[0] else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            self.key_cache[layer, pos] = k
            self.value_cache[layer, pos] = v
            att_out = np.zeros(self.dim, np.float32)
            for h in range(self.heads):
                kvh = h // kv_mul
                qh = q[h * hs : (h + 1) * hs]
                keys = self.key_cache[layer, : pos + 1, kvh * hs : (kvh + 1) * hs]
                scores = keys @ qh / np.sqrt(hs)
                scores = np.exp(scores - scores.max())
                scores /= scores.sum()
                values = self.value_cache[layer, : pos + 1, kvh * hs : (kvh + 1) * hs]
                att_out[h * hs : (h + 1) * hs] = scores @ values
            x = x + self.wo[layer] @ att_out
            xb = self.rmsnorm(x, self.rms_ffn[layer])
            h1, h3 = self.w1[layer] @ xb, self.w3[layer] @ xb
            x = x + self.w2[layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        return self.wcls @ self.rmsnorm(x, self.rms_final)

    def greedy(self, steps: int, prompt: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        """run.c's generate loop at temperature 0: stops early on BOS like run.c does.

        Returns the generated ids (prompt excluded, BOS first) and the logits at every position.
        """
        tokens = list(prompt or [1])
        all_logits = []
        token, out = tokens[0], [tokens[0]]
        for pos in range(steps):
            logits = self.forward(token, pos)
            all_logits.append(logits)
            token = tokens[pos + 1] if pos + 1 < len(tokens) else int(np.argmax(logits))
            if token == 1:
                break
            out.append(token)
        return out, np.stack(all_logits)


def naive_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's `encode` as written there: O(n²) scan for the best-scoring adjacent pair, BOS first."""
    lookup: dict[bytes, int] = {}
    for i, piece in enumerate(pieces):
        lookup.setdefault(piece, i)
    tokens = [1]
    if text:
        for char in " " + text:
            raw = char.encode("utf-8")
            tokens.extend([lookup[raw]] if raw in lookup else [b + 3 for b in raw])
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):  # BOS takes part, as in run.c (it never merges)
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]
