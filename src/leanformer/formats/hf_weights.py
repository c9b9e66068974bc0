"""Safety for HF checkpoint folders: index files that may not point outside the folder, and
pytorch_model.bin read as plain tensors only (weights_only=True, so a pickle's code is never run)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from leanformer.errors import LeanformerError


def first_line(e: BaseException) -> str:
    """`Type: first non-empty line` of an exception: library messages can run to many lines."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def shard_files(folder: Path, index_name: str) -> list[str]:
    """The shard files a *.index.json names, each checked to lie inside `folder`: a hostile index must
    not make us read /etc/... or ../other-model (the HF hub cache's snapshot → blobs links are allowed)."""
    path = folder / index_name
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LeanformerError(f"{path} is not a readable JSON index ({first_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LeanformerError(f"{path} has no weight_map (tensor name -> shard file)")
    files = sorted(set(weight_map.values()), key=str)
    suffix = index_name.removesuffix(".index.json").rsplit(".", 1)[-1]  # safetensors | bin
    root = folder.resolve()
    blobs = (folder.parent.parent / "blobs").resolve() if folder.parent.name == "snapshots" else None
    for f in files:
        rel = Path(f) if isinstance(f, str) else None
        if rel is None or not f or rel.is_absolute() or ".." in rel.parts or not f.endswith("." + suffix):
            raise LeanformerError(
                f"{path}: refusing shard {f!r}: not a .{suffix} file inside the model folder"
            )
        real = (folder / rel).resolve()
        if not (real.is_relative_to(root) or (blobs is not None and real.parent == blobs)):
            raise LeanformerError(
                f"{path}: refusing shard {f!r}: it resolves outside the model folder ({real})"
            )
    return files


def torch_weights(fp: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """pytorch_model.bin: tensors only (weights_only=True: a pickle's code is refused, never run).
    `mmap`: the tensors stay in a private memory map of the file (pages read only when touched; the
    zip layout torch.save has written since PyTorch 1.6), so nothing is read yet."""
    try:
        state = torch.load(fp, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # garbage bytes, or objects/code weights_only does not allow
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith(boilerplate)), "unpickling failed")
        raise LeanformerError(
            f"{fp}: not a PyTorch file of plain tensors; refused without running any of it ({detail})"
        ) from None
    except RuntimeError as e:
        if mmap and "_use_new_zipfile_serialization" in str(e):  # a pre-1.6 (non-zip) pickle
            raise LeanformerError(
                f"{fp}: a legacy (pre-zip) PyTorch file cannot be read tensor by tensor; re-save it with "
                "torch.save (or as safetensors), or compress in memory (--in-memory / lazy=False)"
            ) from None
        raise LeanformerError(f"{fp}: corrupt or truncated PyTorch weights file ({first_line(e)})") from None
    except Exception as e:  # EOFError, OSError, ...: a corrupt or truncated file
        raise LeanformerError(f"{fp}: corrupt or truncated PyTorch weights file ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LeanformerError(f"{fp}: holds a {type(state).__name__}, not a dict of named tensors")
    return state
