"""ONNX export of decoder LMs (Llama family incl. SmolLM2 / Mistral / Qwen2, and GPT-2) with past
key/values, so that ONNX Runtime generates incrementally; a parity check against our PyTorch forward on
every export; and a greedy runner over the exported graph.

Graph (HF optimum's names, so other tools recognise it), every axis dynamic:
    input_ids [batch, seq], attention_mask [batch, past + seq] (1 = real token, left padding allowed),
    position_ids [batch, seq], past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    → logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]
A prefill passes past tensors with past = 0; each later step feeds the presents back as the past.
The graph is traced through the model's own forward (models/llama.py, models/gpt2.py): a stand-in for
the engine's KVCache concatenates past and new keys/values, so there is no second copy of the model code.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanformer.engine.generate import eos_ids
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache, Step

ONNX_FILE = "model.onnx"
DECODER_FAMILIES = ("llama", "gpt2")


class _PastKV:
    """Duck-types engine.cache.KVCache for one traced forward: begin() plans the step from the graph's
    attention_mask / position_ids inputs, update() appends this step's k/v to the past and records them."""

    def __init__(self, past: list[torch.Tensor], attention_mask: torch.Tensor, position_ids: torch.Tensor):
        self.past, self.mask, self.positions = past, attention_mask, position_ids
        self.present: list[torch.Tensor] = [torch.empty(0)] * len(past)

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        past_len = self.past[0].shape[2]
        keys = torch.arange(past_len + n_new)  # [S]
        queries = past_len + torch.arange(n_new)  # [T]: where this step's tokens sit among the keys
        causal = keys[None, :] <= queries[:, None]  # [T, S]
        # A left-padding query may see only itself: a row with nothing visible would give NaN, and
        # NaN values leak through later softmax weights of 0 (0 × NaN = NaN).
        visible = self.mask.bool()[:, None, None, :] | (keys[None, :] == queries[:, None])  # [B, 1, T, S]
        return Step(slots, self.positions, past_len + n_new, causal & visible, False, None)

    def update(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
        k = torch.cat([self.past[2 * layer], k], dim=2)  # [B, KV, P + T, D]
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present[2 * layer], self.present[2 * layer + 1] = k, v
        return k, v


class _DecoderGraph(nn.Module):
    """What gets exported: one forward of the model over explicit past k/v tensors (flat list k0, v0, ...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        cache = _PastKV(past, attention_mask, position_ids)
        logits = self.model(input_ids, cache=cache)  # [B, T, V]
        return logits, *cache.present


def _names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _check_exportable(model: nn.Module) -> None:
    if getattr(model, "family", None) not in DECODER_FAMILIES:
        raise LeanformerError(
            f"decoder ONNX export covers {', '.join(DECODER_FAMILIES)} models, not {getattr(model, 'family', '?')}"
        )
    if next(model.parameters()).dtype != torch.float32:
        raise LeanformerError("export a float32 model (load it with dtype='float32')")
    from leanformer.compress.lowrank import LowRankLinear  # two plain Linears: exported as they are

    quantized = [
        n
        for n, m in model.named_modules()
        if "Linear" in type(m).__name__ and not isinstance(m, (nn.Linear, LowRankLinear))
    ]
    if quantized:
        raise LeanformerError(
            f"{quantized[0]} is a {type(model.get_submodule(quantized[0])).__name__}: quantized and sparse-stored "
            "Linears have no ONNX form here; export before quantizing (pruned and low-rank models export)"
        )


def empty_past(model_args, batch: int) -> list[torch.Tensor]:
    shape = (batch, model_args.num_key_value_heads, 0, model_args.head_dim)
    return [torch.zeros(shape) for _ in range(2 * model_args.num_hidden_layers)]


def export_decoder_onnx(model: nn.Module, out_dir: str | os.PathLike, tok=None, opset: int = 18) -> dict:
    """Write OUT/model.onnx (+ config.json, tokenizer) for `model` and check it against our forward.

    Uses torch.onnx's torch.export-based exporter (the TorchScript one cannot convert grouped-query
    SDPA). Returns {"path", "seconds", "max_abs_diff": {"prefill_logits", "step_logits"}}.
    """
    from leanformer.kernels.modules import plain_linears

    _check_exportable(model)
    a = model.args
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # trace a step with a non-empty past (2 rows, 3 new tokens after 4 cached): sizes 0 and 1 would be
    # specialised by torch.export; the graph then also runs prefill (past 0) and decode (seq 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (2, 3), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    positions = torch.arange(4, 7).repeat(2, 1)
    past = [
        torch.randn(2, a.num_key_value_heads, 4, a.head_dim, generator=g)
        for _ in range(2 * a.num_hidden_layers)
    ]
    batch, seq, past_len = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    total = torch.export.Dim.AUTO  # = past + seq, which torch.export works out itself
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past_len}] * len(past),
    }
    in_names = [
        "input_ids",
        "attention_mask",
        "position_ids",
        *_names(a.num_hidden_layers, "past_key_values"),
    ]
    out_names = ["logits", *_names(a.num_hidden_layers, "present")]
    t0 = time.perf_counter()
    with plain_linears(model), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                _DecoderGraph(model).eval(),
                (ids, mask, positions, past),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=in_names,
                output_names=out_names,
                opset_version=opset,
                verbose=False,
            )
            mask_input = program.model.graph.inputs[1]  # torch.export named its length "s<n>"
            mask_input.shape = type(mask_input.shape)([mask_input.shape[0], "past + seq"])
            program.save(str(out / ONNX_FILE), external_data=_large(model))
        except Exception as e:  # the exporter raises many types; the user needs one line
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise LeanformerError(f"ONNX export failed: {msg}") from e
    seconds = time.perf_counter() - t0
    (out / "config.json").write_text(json.dumps(model.config, indent=2, default=str))
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out))
    diffs = check_decoder_parity(model, out / ONNX_FILE)
    return {"path": str(out / ONNX_FILE), "seconds": round(seconds, 2), "max_abs_diff": diffs}


def _large(model: nn.Module) -> bool:
    """Whether the weights need ONNX's external-data file (one protobuf holds at most 2 GB)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values()) > 1.8e9


@contextmanager
def _quiet_exporter():
    """Silence the exporter's INFO/WARNING chatter ("torchvision is not installed", rewrite notes); the
    registration logger sets its own level, so it is named here too."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_decoder_parity(model: nn.Module, onnx_path: str | os.PathLike) -> dict[str, float]:
    """Max |ONNX Runtime − our PyTorch forward| on a prefill of a left-padded batch of 2 and one step
    after it with the presents fed back (padding positions excluded)."""
    runner = OrtDecoder(onnx_path, model.config)
    a = model.args
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, a.vocab_size, (n,), generator=g).tolist() for n in (9, 6)]
    nxt = torch.randint(0, a.vocab_size, (2,), generator=g).tolist()
    ids, mask, positions = left_pad(prompts)
    logits, present = runner.forward(ids, mask, positions, runner.empty_past(2))
    step, _ = runner.forward(
        np.array(nxt)[:, None],
        np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
        positions[:, -1:] + 1,
        present,
    )
    diffs = {"prefill_logits": 0.0, "step_logits": 0.0}
    with torch.inference_mode():
        for row, p in enumerate(prompts):  # each row alone through our cache path: what generate() does
            cache = KVCache.for_model(model, 1, len(p) + 1)
            want = model(torch.tensor([p]), cache=cache)[0]  # [T, V]
            cache.advance(torch.tensor([0]), len(p))
            want_step = model(torch.tensor([[nxt[row]]]), cache=cache)[0, -1]
            got = torch.from_numpy(logits[row, -len(p) :])
            diffs["prefill_logits"] = max(diffs["prefill_logits"], float((got - want).abs().max()))
            got_step = torch.from_numpy(step[row, -1])
            diffs["step_logits"] = max(diffs["step_logits"], float((got_step - want_step).abs().max()))
    return diffs


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts → input_ids, attention_mask, position_ids [B, T], left-padded so that every row's next
    token lands in the same column; positions count real tokens only (pads get 0)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, positions


class OrtDecoder:
    """An exported decoder run by ONNX Runtime: forward over explicit past k/v, and greedy generation."""

    def __init__(self, onnx_path: str | os.PathLike, config: dict | None = None, threads: int | None = None):
        from leanformer.export.encoder import ort_session
        from leanformer.loading import family_of

        self.session, self.config = ort_session(onnx_path, config, threads)
        self.args = family_of(self.config).ModelArgs.from_hf_config(self.config)
        self.past_names = _names(self.args.num_hidden_layers, "past_key_values")
        self.stop_ids = eos_ids(self, None)  # load_onnx_decoder adds the tokenizer's

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [t.numpy() for t in empty_past(self.args, batch)]

    def forward(self, ids, mask, positions, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids / positions [B, T], mask [B, P + T], past 2·layers × [B, KV, P, D] → logits, presents."""
        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64)}
        feed["position_ids"] = np.asarray(positions, np.int64)
        feed |= dict(zip(self.past_names, past))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: Iterable[int] | None = None
    ) -> list[list[int]]:
        """Greedy continuation of each prompt (a batch is left-padded): new ids, the stop token excluded,
        as leanformer.generate returns them for id prompts. stop_ids: None = the model's EOS ids,
        () = none (generate's ignore_eos)."""
        stop_ids = self.stop_ids if stop_ids is None else set(stop_ids)
        if not prompts or not all(prompts):
            raise LeanformerError("give at least one non-empty prompt of token ids")
        if max(map(len, prompts)) + max_new_tokens > self.args.max_position_embeddings:
            raise LeanformerError(
                f"prompt + max_new_tokens exceeds the context of {self.args.max_position_embeddings}"
            )
        ids, mask, positions = left_pad(prompts)
        past = self.empty_past(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, positions, past)
            nxt = logits[:, -1].argmax(-1)  # [B]
            for i, t in enumerate(nxt.tolist()):
                done[i] |= t in stop_ids
                if not done[i]:
                    out[i].append(t)
            if done.all():
                break
            # finished rows keep stepping (the batch stays rectangular); their tokens are ignored
            ids, positions = nxt[:, None], positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        return out


def load_onnx_decoder(folder: str | os.PathLike, threads: int | None = None):
    """An export folder (model.onnx + config.json [+ tokenizer]) → (OrtDecoder, tokenizer or None)."""
    from leanformer.loading import load_tokenizer

    folder = Path(folder).expanduser()
    path = folder / ONNX_FILE if folder.is_dir() else folder
    runner, tok = OrtDecoder(path, threads=threads), load_tokenizer(path.parent)
    runner.stop_ids = eos_ids(runner, tok)
    return runner, tok
