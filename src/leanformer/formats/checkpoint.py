"""HF folders, GGUF files and llama2.c checkpoints read into (HF-style config dict, HF-named state
dict, tokenizer): the files-to-dicts half of `leanformer.load` (loading.py builds the model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from leanformer.errors import LeanformerError
from leanformer.formats.hf_weights import first_line, shard_files, torch_weights

_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_any(p: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    if p.is_file() and p.suffix == ".gguf":
        from leanformer.formats.gguf import read_gguf

        return read_gguf(p)
    if p.is_dir() and (p / "config.json").exists():
        return read_hf_folder(p)
    if p.is_file() and p.suffix == ".bin" or p.is_dir() and list(p.glob("*.bin")):
        from leanformer.formats.llama2c import read_llama2c

        return read_llama2c(p)
    if p.is_dir() and list(p.glob("*.gguf")):
        return read_any(sorted(p.glob("*.gguf"))[0])
    raise LeanformerError(
        f"don't know how to load {p}: expected an HF folder with config.json, a .gguf file, or a llama2.c .bin"
    )


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    return read_config(folder / "config.json"), read_weights(folder), load_tokenizer(folder)


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LeanformerError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise LeanformerError(f"{path} is not UTF-8 text (not a config file?)") from None
    except OSError as e:
        raise LeanformerError(f"cannot read {path} ({e.strerror})") from None
    if not isinstance(config, dict):
        raise LeanformerError(f"{path} is not a JSON object of config keys")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from leanformer.formats.safetensors_io import SafetensorsFormatError, read_safetensors

    present = [name for name in _HF_WEIGHTS if (folder / name).exists()]
    if not present:
        raise LeanformerError(f"no weights in {folder}: expected one of {', '.join(_HF_WEIGHTS)}")
    name = present[0]
    files = shard_files(folder, name) if name.endswith(".index.json") else [name]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        fp = folder / f
        if not fp.is_file():
            raise LeanformerError(f"weight shard {fp} listed in the index is missing")
        if not f.endswith(".safetensors"):
            state.update(torch_weights(fp))
            continue
        try:
            state.update(read_safetensors(fp))
        except (SafetensorsFormatError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LeanformerError(f"corrupt or truncated weights file {fp}: {msg}") from None
    return state


def load_tokenizer(folder: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if any((folder / n).exists() for n in names):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises anything from OSError to JSON errors on bad files
            raise LeanformerError(f"{folder}: the tokenizer files cannot be read ({first_line(e)})") from None
    bins = sorted(folder.glob("tok*.bin"))  # llama2.c tokenizers: tok512.bin, tokenizer.bin
    if bins:
        from leanformer.formats.llama2c import Llama2cTokenizer

        return Llama2cTokenizer(bins[0])
    return None
