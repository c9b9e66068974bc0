"""Training checkpoints: one file, written atomically (temp file in the same folder, then rename), with
everything an exact resume needs: the student's weights, AdamW's moments, the scheduler, the step, the
RNG state, and a fingerprint of the run (teacher, student shapes, data, hyper-parameters), so a resume
from another run's checkpoint is refused before training starts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from leanformer.errors import LeanformerError
from leanformer.outputs import write_file_atomic

FORMAT = "leanformer-distill-checkpoint-1"


def fingerprint(**fields) -> str:
    """A stable hash of the run's defining settings (JSON of the fields, sorted)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_hash(data) -> str:
    """A hash of the training examples (token windows or sentences) in order."""
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(data.contiguous().numpy().tobytes())
    else:
        for s in data:
            h.update(s.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def weights_hash(model) -> str:
    """A hash of a strided sample of every tensor of the model (its starting point; cheap for 100M+)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` (+ format tag) to `path` atomically (temp file in the same folder, then rename): a
    resume after a crash never reads half a checkpoint, and a failed write leaves the previous one."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: str | os.PathLike, run: str) -> dict:
    """The checkpoint at `path` if it belongs to run `run` (its fingerprint), else a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LeanformerError(f"--resume: no checkpoint at {path}; run once without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle / zip errors of many kinds
        raise LeanformerError(
            f"--resume: {path} is not a readable distillation checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LeanformerError(f"--resume: {path} is not a leanformer distillation checkpoint")
    if state.get("run") != run:
        raise LeanformerError(
            f"--resume: {path} is from another run (different teacher, student, data or settings); "
            "resume with the same arguments, or start afresh without --resume"
        )
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
