"""ONNX export of BERT-family encoders, a parity check against our PyTorch forward on every export, and
an ONNX Runtime runner that plugs into encoders.embed / classify / eval like a torch model.

An export folder holds model.onnx (single file), config.json (our config, incl. pooling/normalization)
and the tokenizer, so `leanformer embed OUT --backend onnxruntime` needs nothing else.
Graph: input_ids, attention_mask [batch, seq] (int64, dynamic) → last_hidden_state [batch, seq, hidden],
sentence_embedding [batch, D] (pooled, not normalized: the runner normalizes, so it can be switched off),
and logits [batch, labels] when the model has a classification head or a probe.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanformer.errors import LeanformerError

ONNX_FILE = "model.onnx"


class _Graph(nn.Module):
    """What gets traced: the encoder plus pooling and, when present, the classifier."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        m = self.model
        hidden = m(input_ids, attention_mask)  # [B, T, hidden]
        pooled = m.pool(hidden, attention_mask, normalize=False)  # [B, D]
        if m.head is not None:
            return hidden, pooled, m.head(hidden)
        if m.probe is not None:
            return hidden, pooled, m.probe(F.normalize(pooled, dim=-1) if m.args.normalize else pooled)
        return hidden, pooled


def _outputs(model) -> list[str]:
    extra = ["logits"] if model.head is not None or model.probe is not None else []
    return ["last_hidden_state", "sentence_embedding", *extra]


def _sample_inputs(model, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of 3 (lengths T, T-3, 2) for tracing and the parity check."""
    if tok is not None:
        from leanformer.encoders.embed import length_sorted_batches

        texts = ["The quick brown fox jumps over the lazy dog near the river bank.", "A short one.", "Hi"]
        _, ids, mask = next(iter(length_sorted_batches(model, tok, texts, 8)))
        return ids, mask
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.args.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:], mask[2, 2:] = 0, 0
    ids[mask == 0] = model.args.pad_token_id
    return ids, mask


def export_onnx(model, out_dir: str | os.PathLike, tok=None, opset: int = 18, dynamo: bool = True) -> dict:
    """Write OUT/model.onnx (+ config.json, tokenizer) and check it against our forward.

    dynamo: torch.onnx's torch.export-based exporter (default); False uses the TorchScript one, faster
    to run and equally exact here. Returns {"path", "seconds", "max_abs_diff": {output: diff}}.
    """
    from leanformer.kernels.modules import plain_linears

    if any(p.dtype != torch.float32 for p in model.parameters()):  # bf16 Linears too (load_encoder bf16)
        raise LeanformerError("export a float32 model (ONNX Runtime's CPU kernels are fp32)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ids, mask = _sample_inputs(model, tok)
    names = _outputs(model)
    t0 = time.perf_counter()
    graph = _Graph(model).eval()
    # quiet the exporter's "torchvision is not installed" notes; its loggers set their own levels
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [q.level for q in quiet]
    with plain_linears(model), warnings.catch_warnings():  # oneDNN packed matmuls have no ONNX form
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        kw: dict = dict(input_names=["input_ids", "attention_mask"], output_names=names, opset_version=opset)
        if dynamo:
            b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
            shapes = {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: t}}
            kw |= dict(dynamo=True, dynamic_shapes=shapes, external_data=False, verbose=False)
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
            axes |= {"last_hidden_state": {0: "batch", 1: "seq"}, "sentence_embedding": {0: "batch"}}
            axes |= {"logits": {0: "batch"}} if "logits" in names else {}
            kw |= dict(dynamo=False, dynamic_axes=axes)
        try:
            torch.onnx.export(graph, (ids, mask), str(out / ONNX_FILE), **kw)
        except Exception as e:  # the exporters raise many types; the user needs one line
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise LeanformerError(
                f"ONNX export failed ({'dynamo' if dynamo else 'torchscript'}): {msg}"
            ) from e
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    seconds = time.perf_counter() - t0
    (out / "config.json").write_text(json.dumps(model.config, indent=2, default=str))
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out))
    diffs = check_parity(model, out / ONNX_FILE, ids, mask)
    return {"path": str(out / ONNX_FILE), "seconds": round(seconds, 2), "max_abs_diff": diffs}


def check_parity(model, onnx_path, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Max |ONNX Runtime − our PyTorch forward| per output on one padded batch (padding rows excluded)."""
    runner = OrtEncoder(onnx_path, model.config)
    got = runner.run(ids, mask)
    with torch.inference_mode():
        want = [t.float() for t in _Graph(model)(ids, mask)]
    diffs = {}
    for name, w in zip(_outputs(model), want):
        g = torch.from_numpy(got[name])
        if name == "last_hidden_state":  # padded positions are don't-care values
            g, w = g[mask.bool()], w[mask.bool()]
        diffs[name] = float((g - w).abs().max())
    return diffs


def ort_session(onnx_path: str | os.PathLike, config: dict | None, threads: int | None):
    """→ (ONNX Runtime CPU session, HF-style config: given, or the config.json the export wrote)."""
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.exists():
        raise LeanformerError(f"ONNX file not found: {path}")
    if config is None:
        cfg_path = path.parent / "config.json"
        if not cfg_path.exists():
            raise LeanformerError(f"no config.json beside {path}: export with `leanformer export`")
        config = json.loads(cfg_path.read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), config


class OrtEncoder:
    """An exported encoder run by ONNX Runtime; duck-types the parts of models.bert.Model that embed,
    classify and the evaluations use (.args, .embed, .logits, __call__)."""

    def __init__(self, onnx_path: str | os.PathLike, config: dict | None = None, threads: int | None = None):
        from leanformer.models.bert import ModelArgs

        self.session, self.config = ort_session(onnx_path, config, threads)
        self.args = ModelArgs.from_hf_config(self.config)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.head = self.probe = None  # the classifier, if any, is inside the graph

    def run(
        self, ids: torch.Tensor, mask: torch.Tensor, names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        names = names or self.outputs
        return dict(zip(names, self.session.run(names, feed)))

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, token_type_ids=None
    ) -> torch.Tensor:
        mask = torch.ones_like(ids) if mask is None else mask
        return torch.from_numpy(self.run(ids, mask, ["last_hidden_state"])["last_hidden_state"])

    def embed(self, ids, mask=None, token_type_ids=None, normalize: bool | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids) if mask is None else mask
        e = torch.from_numpy(self.run(ids, mask, ["sentence_embedding"])["sentence_embedding"])
        normalize = self.args.normalize if normalize is None else normalize
        return F.normalize(e, dim=-1) if normalize else e

    def logits(self, ids, mask=None, token_type_ids=None) -> torch.Tensor:
        if "logits" not in self.outputs:
            raise LeanformerError("this ONNX export has no classifier (no head and no probe when exported)")
        mask = torch.ones_like(ids) if mask is None else mask
        return torch.from_numpy(self.run(ids, mask, ["logits"])["logits"])


def load_onnx_encoder(folder: str | os.PathLike, threads: int | None = None):
    """An export folder (model.onnx + config.json + tokenizer) → (OrtEncoder, tokenizer)."""
    from leanformer.encoders.build import load_tokenizer

    folder = Path(folder).expanduser()
    path = folder / ONNX_FILE if folder.is_dir() else folder
    runner = OrtEncoder(path, threads=threads)
    return runner, load_tokenizer(path.parent)
