"""llama2.c checkpoints (karpathy/llama2.c legacy export, "version 0") and their tokenizer files.

Checkpoint: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
a negative vocab_size means the classifier is not shared with the embedding), then float32 arrays in
run.c's order. Matrices are stored [out, in] like torch's Linear, so only two things need converting:
names, and the q/k rows — run.c rotates interleaved pairs (2j, 2j+1), HF-convention models rotate
halves (j, j + d/2) with the same frequencies, so the rows are permuted into HF's layout.

Tokenizer: int32 max_token_length, then per token float32 score, int32 length, bytes.
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanformer.errors import LeanformerError
from leanformer.formats.gguf import interleaved_to_half_rows

BOS_ID, EOS_ID = 1, 2
_HEADER = struct.Struct("<7i")
_VERSIONED_MAGIC = b"24ka"  # 0x616b3432 as written by llama2.c's newer export (version >= 1)


def _read_tokenizer_file(path: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], int]:
    """(pieces, scores, max_token_length) of a llama2.c tokenizer file; reads to EOF or `vocab_size`."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise LeanformerError(f"{path}: cannot read tokenizer ({e.strerror})") from e
    pieces: list[bytes] = []
    scores: list[float] = []
    try:
        (max_len,) = struct.unpack_from("<i", blob, 0)
        pos = 4
        while pos < len(blob) and (vocab_size is None or len(pieces) < vocab_size):
            score, length = struct.unpack_from("<fi", blob, pos)
            if length < 0 or pos + 8 + length > len(blob):
                raise struct.error(f"token {len(pieces)} runs past the end of the file")
            pieces.append(blob[pos + 8 : pos + 8 + length])
            scores.append(score)
            pos += 8 + length
    except struct.error as e:
        raise LeanformerError(f"{path}: not a llama2.c tokenizer file, truncated or corrupt ({e})") from e
    if vocab_size is not None and len(pieces) != vocab_size:
        raise LeanformerError(f"{path}: has {len(pieces)} tokens, the model expects {vocab_size}")
    return pieces, scores, max_len


class Llama2cTokenizer:
    """llama2.c's tokenizer: byte-fallback BPE that greedily merges the best-scoring adjacent pair.

    A small surface in HF's spirit (encode / decode / special ids / chat_template) so the engine can use
    it like a transformers tokenizer. Encoding follows run.c exactly, ties going to the leftmost pair.
    """

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id: int | None = None
    chat_template: str | None = None

    def __init__(
        self,
        path: str | Path | None = None,
        vocab_size: int | None = None,
        *,
        pieces: list[bytes] | None = None,
        scores: list[float] | None = None,
    ) -> None:
        """Read a tokenizer.bin / tok512.bin file, or take `pieces` and `scores` directly.

        `vocab_size` (the model's) is checked against the file when given.
        """
        self.max_token_length = 0
        if path is not None:
            pieces, scores, self.max_token_length = _read_tokenizer_file(Path(path), vocab_size)
        if pieces is None or scores is None or len(pieces) != len(scores):
            raise LeanformerError(
                "Llama2cTokenizer needs a tokenizer file, or pieces and scores of equal length"
            )
        self.pieces, self.scores = pieces, scores
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._ids.setdefault(
                piece, i
            )  # run.c's binary search finds one of any duplicates; take the first

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `tokenizer.bin` in llama2.c's format (so `leanformer.save` keeps the tokenizer)."""
        out = Path(folder) / "tokenizer.bin"
        max_len = max(self.max_token_length, max((len(p) for p in self.pieces), default=0))
        with open(out, "wb") as f:
            f.write(struct.pack("<i", max_len))
            for piece, score in zip(self.pieces, self.scores):
                f.write(struct.pack("<fi", score, len(piece)) + piece)
        return out

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(
        self, text: str, add_bos: bool = True, add_eos: bool = False, add_special_tokens: bool | None = None
    ) -> list[int]:
        """Token ids as run.c's `encode` makes them (`add_special_tokens`, HF's name, overrides add_bos)."""
        if add_special_tokens is not None:
            add_bos = add_special_tokens
        ids: list[int] = [BOS_ID] if add_bos else []
        if text:
            ids.extend(self._merge(self._symbols(" " + text)))  # sentencepiece's dummy prefix
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def _symbols(self, text: str) -> list[int]:
        """One id per character, or its UTF-8 bytes as byte tokens (<0xXX> is id byte + 3) when unknown."""
        out: list[int] = []
        for char in text:
            raw = char.encode("utf-8", errors="surrogatepass")
            token = self._ids.get(raw)
            if token is not None:
                out.append(token)
            else:
                out.extend(b + 3 for b in raw)
        return out

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop (best score first, leftmost on ties) in O(n log n) with a heap.

        A pair is keyed by its left symbol's original position, which keeps left-to-right order as
        symbols merge, so popping (−score, position) picks exactly the pair run.c's scan would pick.
        """
        n = len(ids)
        tokens: list[int | None] = list(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < n:
                merged = self._ids.get(self.pieces[tokens[left]] + self.pieces[tokens[right]])  # type: ignore[index]
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], left, merged, tokens[left], tokens[right]))  # type: ignore[arg-type]

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, merged, left_tok, right_tok = heapq.heappop(heap)
            right = nxt[left]
            if tokens[left] != left_tok or right >= n or tokens[right] != right_tok:
                continue  # stale: one side has merged since this entry was pushed
            tokens[left], tokens[right] = merged, None
            nxt[left] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = left
            push(left)
            if prv[left] >= 0:
                push(prv[left])
        return [t for t in tokens if t is not None]

    def _piece_bytes(self, token: int, prev: int | None) -> bytes:
        piece = self.pieces[token]
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]  # run.c drops the dummy-prefix space of the first word after BOS
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (<0xXX> byte tokens joined into UTF-8; BOS/EOS/UNK dropped unless asked)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        prev: int | None = None
        for token in ids:
            token = int(token)
            if not (skip_special_tokens and token in (0, BOS_ID, EOS_ID)):
                out += self._piece_bytes(token, prev)
            prev = token
        return out.decode("utf-8", errors="replace")


def _find_tokenizer(checkpoint: Path, vocab_size: int) -> Llama2cTokenizer | None:
    """The first of tok{vocab}.bin, tokenizer.bin, other tok*.bin beside the checkpoint that fits it."""
    folder = checkpoint.parent
    candidates = [folder / f"tok{vocab_size}.bin", folder / "tokenizer.bin", *sorted(folder.glob("tok*.bin"))]
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file() and candidate != checkpoint:
            try:
                return Llama2cTokenizer(candidate, vocab_size)
            except LeanformerError:
                continue  # another model's tokenizer in the same folder
    return None


def _checkpoint_in(folder: Path) -> Path:
    """The one .bin in `folder` that is not a tokenizer file."""
    bins = [
        p for p in sorted(folder.glob("*.bin")) if not (p.name.startswith("tok") or p.name == "tokenizer.bin")
    ]
    if len(bins) != 1:
        found = ", ".join(p.name for p in bins) or "none"
        raise LeanformerError(f"{folder}: expected one llama2.c checkpoint .bin, found {found}")
    return bins[0]


def read_llama2c(
    path: str | Path, tokenizer_path: str | Path | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Llama2cTokenizer | None]:
    """Config, float32 HF-named state dict (q/k rows in rotate_half layout) and tokenizer of a .bin.

    `path` may be a folder holding one checkpoint .bin (tokenizer files aside). Without
    `tokenizer_path`, a tokenizer file beside the checkpoint is used when there is one.
    """
    path = Path(path)
    if path.is_dir():
        path = _checkpoint_in(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise LeanformerError(f"{path}: cannot read llama2.c checkpoint ({e.strerror})") from e
    if blob[:4] == _VERSIONED_MAGIC:
        raise LeanformerError(
            f"{path}: llama2.c versioned export; only the legacy (version 0) format is read"
        )
    if len(blob) < _HEADER.size:
        raise LeanformerError(f"{path}: {len(blob)} bytes, too short for a llama2.c header ({_HEADER.size})")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(blob)
    shared, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise LeanformerError(
            f"{path}: not a llama2.c checkpoint (header dim={dim} hidden={hidden} layers={layers} "
            f"heads={heads} kv_heads={kv_heads} vocab={vocab} seq_len={seq_len})"
        )
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embed", (vocab, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis", (2, seq_len, head_dim // 2)),  # precomputed RoPE tables: not needed
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    expected = _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(blob) != expected:
        raise LeanformerError(
            f"{path}: expected {expected} bytes for a llama2.c checkpoint with this header, got {len(blob)} "
            "(truncated, or not a legacy llama2.c export)"
        )

    floats = np.frombuffer(blob, dtype="<f4", offset=_HEADER.size)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = floats[offset : offset + count].reshape(shape)
        offset += count

    q_rows = interleaved_to_half_rows(dim, heads)
    k_rows = interleaved_to_half_rows(kv_dim, kv_heads)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: owns its memory, writable

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": tensor(arrays["embed"])}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensor(arrays["rms_att"][i])
        sd[p + "self_attn.q_proj.weight"] = tensor(arrays["wq"][i][q_rows])
        sd[p + "self_attn.k_proj.weight"] = tensor(arrays["wk"][i][k_rows])
        sd[p + "self_attn.v_proj.weight"] = tensor(arrays["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = tensor(arrays["wo"][i])
        sd[p + "post_attention_layernorm.weight"] = tensor(arrays["rms_ffn"][i])
        sd[p + "mlp.gate_proj.weight"] = tensor(arrays["w1"][i])
        sd[p + "mlp.down_proj.weight"] = tensor(arrays["w2"][i])
        sd[p + "mlp.up_proj.weight"] = tensor(arrays["w3"][i])
    sd["model.norm.weight"] = tensor(arrays["rms_final"])
    if not shared:
        sd["lm_head.weight"] = tensor(arrays["wcls"])

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": shared,
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    if tokenizer_path is not None:
        tokenizer = Llama2cTokenizer(tokenizer_path, vocab)
    else:
        tokenizer = _find_tokenizer(path, vocab)
    return config, sd, tokenizer
