"""load(path) → (model, tokenizer) for HF folders, GGUF files, llama2.c checkpoints and our own saves.

Every format is first read into (HF-style config dict, HF-named state dict, tokenizer); one path then
builds the model on the meta device, checks every tensor's name and shape, and assigns the weights
without a second copy in memory.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from torch import nn

from leanformer.errors import LeanformerError
from leanformer.formats.checkpoint import (  # noqa: F401  (read_* / load_tokenizer: re-exported)
    load_tokenizer,
    read_any,
    read_config,
    read_hf_folder,
    read_weights,
)
from leanformer.formats.hf_weights import first_line
from leanformer.kernels.packed import pack_linears_
from leanformer.models.huge_pages import to_huge_pages
from leanformer.models.layers import Rotary

# family module (under leanformer.models) → the HF architectures it serves
FAMILIES = ("llama", "gpt2", "bert")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
}


def registry() -> dict[str, ModuleType]:
    archs: dict[str, ModuleType] = {}
    for name in FAMILIES:
        try:
            module = importlib.import_module(f"leanformer.models.{name}")
        except ModuleNotFoundError:
            continue
        archs.update({arch: module for arch in module.ARCHITECTURES})
    return archs


def family_of(config: dict, source: str | None = None) -> ModuleType:
    """The models/ module for this config; `source` (the config's file) prefixes the error."""
    archs = registry()
    listed = config.get("architectures")
    arch = listed[0] if isinstance(listed, list) and listed else None
    if arch is None:
        arch = _BY_MODEL_TYPE.get(str(config.get("model_type", "")), "")
    if not isinstance(arch, str) or arch not in archs:
        where = f"{source}: " if source else ""
        raise LeanformerError(
            f"{where}unsupported architecture {arch!r}; supported: {', '.join(sorted(archs))}"
        )
    return archs[arch]


def load(
    path: str | os.PathLike,
    dtype: str = "float32",
    device: str = "cpu",
    fast: bool = True,
    keep_quantized: bool = True,
    lazy: bool = False,
):
    """Load a model and its tokenizer (None when the folder has no tokenizer files).

    path: HF folder (config.json + safetensors / pytorch_model.bin, sharded or not), a .gguf file,
    a llama2.c .bin checkpoint (or its folder), or a folder written by `save`.
    fast: on CPU, run float Linears through faster kernels with the same math: a oneDNN-packed copy
    of each weight for prefill-sized inputs and, for fp32, leanformer's GEMV kernel for decode-sized
    ones (kernels/; built once per machine, torch fallback where it cannot be built). Encoders
    (BERT family) pack for oneDNN only on CPUs where it pays (encoders.build.onednn_pays).
    keep_quantized (default): a GGUF's Q4_0 / Q4_1 / Q4_K tensors load straight into int4 modules and
    Q8_0 / Q5_0 / Q6_K into int8 ones (exactly the file's values, no float copy of the model); other
    tensors are dequantized to float (compress/gguf_quant.py). False dequantizes every tensor to
    `dtype`. No effect on other formats.
    lazy: build the model's structure only and read no weights yet (HF safetensors, GGUF, llama2.c or
    a leanformer save; Llama family): `apply` / `quantize_` then stream it one decoder layer at a
    time, so the float model is never whole in memory (compress/stream.py); `materialize_(model)`
    reads the weights without compressing. A GGUF is read dequantized.
    """
    if dtype not in DTYPES:
        raise LeanformerError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise LeanformerError(
            f"model path not found: {p} (give an HF folder, a .gguf file or a llama2.c .bin)"
        )
    if lazy:
        return _load_lazy(p, DTYPES[dtype], device, fast)
    gguf_files = [p] if p.suffix == ".gguf" else sorted(p.glob("*.gguf")) if p.is_dir() else []
    if keep_quantized and gguf_files and not (p / "config.json").exists():
        from leanformer.compress.gguf_quant import read_gguf_quantized  # GGUF blocks -> int modules

        config, state_dict, tok = read_gguf_quantized(gguf_files[0])
    else:
        config, state_dict, tok = read_any(p)
    source = str(p / "config.json") if p.is_dir() and (p / "config.json").exists() else str(p)
    family = family_of(config, source).__name__.rsplit(".", 1)[-1]
    builder = BUILDERS.get(family, build_decoder)
    model = builder(config, state_dict, p if p.is_dir() else None, DTYPES[dtype], device, fast, source)
    model.loaded_from = str(p.resolve())  # `save` never writes over the folder a model came from
    del state_dict  # the moved tensors' old memory goes back as each one moves
    to_huge_pages(model)  # here, not in the first decode step (a few seconds for a 7B model)
    return model, tok


def _load_lazy(p: Path, dtype: torch.dtype, device: str, fast: bool) -> tuple[nn.Module, object]:
    """The model's structure on the meta device + a tensor source (compress/stream.py reads it)."""
    from leanformer.compress.stream import LazyWeights
    from leanformer.formats.lazy import open_source

    config, tensors, tok = open_source(p)
    source = str(p / "config.json") if config is None else str(p)
    if config is None:
        config, tok = read_config(p / "config.json"), load_tokenizer(p)
    family, args, model, meta = skeleton(config, source, dtype)
    if family.__name__ not in ("leanformer.models.llama", "leanformer.models.gpt2"):
        raise LeanformerError(
            f"{source}: layer-by-layer (lazy) loading serves the Llama family (Llama, Qwen2, Mistral, "
            f"SmolLM) and GPT-2, not {family.__name__.rsplit('.', 1)[-1]}; load it whole "
            "(lazy=False / --in-memory)"
        )
    sanitize = (lambda sd: sd) if meta else (lambda sd: family.sanitize(sd, args))
    shapes = sanitize({n: torch.empty(s, device="meta") for n, s in tensors.shapes.items()})
    check_weights(model, shapes)  # names and shapes, before a single tensor is read
    model.lazy = LazyWeights(
        tensors, sanitize, dtype, device, speed_up_linears_ if fast and device == "cpu" else None,
        _exact_names(model) if meta else set(),
    )  # fmt: skip
    finish(model, config, meta, family, device)
    model.loaded_from = str(p.resolve())
    return model, tok


class Builder(Protocol):
    """(config, HF-named state dict, the folder they came from or None, dtype, device, fast, source)
    → an eval-mode model with its weights assigned (the state dict is consumed)."""

    def __call__(
        self,
        config: dict,
        state_dict: dict[str, torch.Tensor],
        folder: Path | None,
        dtype: torch.dtype,
        device: str,
        fast: bool,
        source: str,
    ) -> nn.Module: ...


# Builders by family name, for families whose models need more than build() + faster Linears: the
# encoders package registers "bert" (pooling / Normalize from the folder, a saved probe, oneDNN packing
# only where it pays), so loading knows no task. Filled when `leanformer` is imported.
BUILDERS: dict[str, Builder] = {}


def register_builder(family: str, builder: Builder) -> None:
    """Let `load` build models of `family` (a module name in models/, e.g. "bert") with `builder`."""
    BUILDERS[family] = builder


def build_decoder(config, state_dict, folder, dtype, device, fast, source) -> nn.Module:
    """The default builder: build(), then on CPU the faster Linears (same math)."""
    model = build(config, state_dict, dtype, device, source)
    if fast and device == "cpu":
        speed_up_linears_(model)
    return model


def speed_up_linears_(model: nn.Module) -> nn.Module:
    """oneDNN-packed weights for prefill, then (fp32) the GEMV kernel for decode; same outputs.

    The LM head is not packed: generation scores only the sampled positions (a decode-sized
    matmul), so a packed copy of the largest matrix would cost memory for nothing but eval speed.
    """
    from leanformer.kernels.modules import use_fast_linears_

    fp32 = next(model.parameters()).dtype == torch.float32  # bf16 has no GEMV kernel: pack all
    pack_linears_(model, skip=("lm_head",) if fp32 else ())
    return use_fast_linears_(model)


class bad_config:
    """Turn the KeyError / TypeError / ... a missing or mistyped config key raises deep inside a model's
    constructor into one line naming the config's file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> None:
        errors = (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, RuntimeError)
        if kind is not None and issubclass(kind, errors) and not isinstance(e, LeanformerError):
            what = f"missing key {e}" if isinstance(e, KeyError) else first_line(e)
            raise LeanformerError(f"{self.source}: invalid model config ({what})") from None


def build(
    config: dict,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str,
    source: str = "model config",
) -> nn.Module:
    """Config + HF-named state dict → a model with weights assigned (no random init, no extra copy).

    Consumes `state_dict` (the caller's dict is emptied): each tensor is freed as soon as its converted
    copy exists, so loading peaks near one copy of the weights, not two. `source` names the config's
    file in errors. Warns when a float weight holds NaN or inf (such a model decodes to nothing).
    """
    state_dict, taken = dict(state_dict), state_dict
    taken.clear()
    family, args, model, meta = skeleton(config, source, dtype)
    if not meta:  # our own saves already use our names
        state_dict = family.sanitize(state_dict, args)
    tied, embedding = check_weights(model, state_dict)
    keep = _exact_names(model) if meta else set()  # quantized modules' scales: never rounded to dtype
    non_finite = []
    for n in list(state_dict):  # one tensor at a time, so the old one is freed before the next copy
        t = state_dict.pop(n)
        cast = t.is_floating_point() and n not in keep
        state_dict[n] = (t.to(dtype) if cast else t).to(device)
        # after the cast: fp32 values beyond fp16's range become inf there
        if state_dict[n].is_floating_point() and not bool(torch.isfinite(state_dict[n]).all()):
            non_finite.append(n)
        del t
    if non_finite:
        warnings.warn(
            f"{len(non_finite)} weight tensor(s) hold NaN or infinite values (e.g. {non_finite[0]!r}): "
            "the model's outputs will be meaningless; is the file corrupt?",
            stacklevel=2,
        )
    if tied:
        state_dict["lm_head.weight"] = state_dict[embedding]
    model.load_state_dict(state_dict, assign=True, strict=True)
    if tied:  # assign=True made two Parameters over one tensor: make them one again
        model.lm_head.weight = model.get_parameter(embedding)
    return finish(model, config, meta, family, device)


def skeleton(config: dict, source: str, dtype: torch.dtype) -> tuple[ModuleType, object, nn.Module, dict]:
    """(family module, ModelArgs, the model on the meta device with any saved layout / recipe structure
    re-applied, config["leanformer"])."""
    family = family_of(config, source)
    meta = config.get("leanformer", {})
    with bad_config(source):
        args = family.ModelArgs.from_hf_config(config)
        with torch.device("meta"):
            model = family.Model(args)
        if not isinstance(meta, dict):
            raise TypeError(f"'leanformer' is a {type(meta).__name__}, not an object")
        if meta.get("quantized_modules"):  # per-module int layout (GGUF keep_quantized), before any recipe
            from leanformer.compress.layout import restore_layout_

            restore_layout_(model, meta["quantized_modules"], dtype)
        if meta.get("recipe"):
            from leanformer.compress import apply

            apply(model, meta["recipe"], structure_only=True)
    return family, args, model, meta


def _created_on_load(model: nn.Module, name: str) -> bool:
    """A tensor a module creates when the file has it: AWQ's `input_scale`, kept only by the Linears whose
    scale could not be folded into the norm before them (compress/qbase.py _load_from_state_dict), so a
    structure-only model cannot list it in advance."""
    module, _, attr = name.rpartition(".")
    if attr != "input_scale":
        return False
    try:
        owner = model.get_submodule(module)
    except AttributeError:
        return False
    return hasattr(owner, "set_input_scale") and owner.input_scale is None


def check_weights(model: nn.Module, state_dict: dict) -> tuple[bool, str | None]:
    """One-line errors for missing, unexpected or misshapen tensors; (LM head tied?, embedding name)."""
    expected = model.state_dict()
    embedding = _embedding_name(expected)
    head = getattr(model, "lm_head", None)
    tied = (
        head is not None
        and embedding is not None
        and getattr(head, "weight", None) is model.get_parameter(embedding)
    )
    missing = [n for n in expected if n not in state_dict and not (tied and n == "lm_head.weight")]
    if missing:
        raise LeanformerError(
            f"weights are missing {len(missing)} tensors, e.g. {missing[0]!r}; wrong or partial file?"
        )
    unexpected = [n for n in state_dict if n not in expected and not _created_on_load(model, n)]
    if unexpected:
        raise LeanformerError(
            f"weights hold {len(unexpected)} tensors the config does not describe, e.g. {unexpected[0]!r}; "
            "does config.json belong to these weights?"
        )
    for name, tensor in state_dict.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise LeanformerError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the config implies {tuple(expected[name].shape)}"
            )
    return tied, embedding


def finish(model: nn.Module, config: dict, meta: dict, family: ModuleType, device: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Rotary):
            m.build()
            m.to(device)
    model.config = {k: v for k, v in config.items() if k != "leanformer"} | (
        {"leanformer": meta} if meta else {}
    )
    model.family = family.__name__.rsplit(".", 1)[-1]
    return model.eval()


def _exact_names(model: nn.Module) -> set[str]:
    from leanformer.compress.layout import exact_state_names

    return exact_state_names(model)


def _embedding_name(names) -> str | None:
    return next((n for n in ("model.embed_tokens.weight", "transformer.wte.weight") if n in names), None)


def save(model: nn.Module, tok, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write config.json (+ recipe), model.safetensors and the tokenizer into the folder `out_dir`.

    `out_dir` may be absent, empty, or an earlier leanformer save, which is replaced atomically (the
    old folder is renamed aside, the new one renamed in, then the old one removed; on failure the old
    one is put back). Any other non-empty folder needs overwrite=True. Refused even then: an existing
    file or symlink at `out_dir`, the filesystem root, the current or home folder, the folder the
    model was loaded from (lf.load records it), and any folder above those (see outputs.py). Files and
    folders get the permissions the umask gives. A model split across processes (parallelize_ /
    pipeline_) holds one shard only: it is refused.
    """
    from leanformer.formats.safetensors_io import write_safetensors
    from leanformer.outputs import check_output_dir, new_temp_dir, replace_dir

    if getattr(model, "tp", None) or getattr(model, "pp", None):
        raise LeanformerError(
            "this model is split across processes (tensor / pipeline parallel): save it before splitting"
        )
    source = getattr(model, "loaded_from", None)
    out = check_output_dir(out_dir, overwrite, inputs=[source] if source else [])
    try:
        tmp = new_temp_dir(out)
    except OSError as e:
        raise LeanformerError(f"cannot save to {out} ({e.strerror})") from None
    try:
        state = {n: t.detach().cpu() for n, t in model.state_dict().items()}  # written one at a time
        head, embedding = getattr(model, "lm_head", None), _embedding_name(state)
        if head is not None and embedding and getattr(head, "weight", None) is model.get_parameter(embedding):
            state.pop("lm_head.weight", None)
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt", "producer": "leanformer"})
        config = dict(model.config)
        config.setdefault("leanformer", {})["family"] = model.family
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LeanformerError(f"cannot save to {out} ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
