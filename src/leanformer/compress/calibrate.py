"""Calibration plumbing shared by GPTQ and AWQ: batches of token ids, running the model, walking its
repeated blocks in order, and per-Linear input statistics gathered with forward hooks.

Sequential walk: one forward per batch, stopped at the first targeted block, records the hidden
state entering it and that block's other arguments (positions, rotary tables, masks: the same for
every block); then block by block, the algorithm gathers statistics by replaying that block on the
cached hidden states, quantizes it, and the block is replayed once more so the next block sees the
outputs of the *quantized* block (what GPTQ calls sequential quantization: later layers correct for
earlier layers' errors). Nothing after the current block is needed, so streaming compression
(compress/stream.py) runs this same walk with `BlockHooks` that read each block's weights just
before it and free its float copy after: the float model is never whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformer.compress.spill import SpilledStates
from leanformer.errors import LeanformerError

Calibration = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]


def to_batches(calibration: Calibration, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """LongTensor [n, T] (or [T]), or a list of them -> list of [b ≤ batch_size, T] on `device`."""
    items = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration or [])
    out: list[torch.Tensor] = []
    for t in items:
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or t.numel() == 0:
            raise LeanformerError(
                "calibration must be a non-empty token-id tensor [n, T] or [T], or a list of them"
            )
        t = t.unsqueeze(0) if t.dim() == 1 else t
        out.extend(b.to(device) for b in t.split(batch_size))
    if not out:
        raise LeanformerError("this config needs calibration data: token ids [n_samples, seq_len]")
    return out


FORWARD_TOKENS = 1024  # calibration tokens per block forward in GPTQ / AWQ (see lean_batch_size)


def lean_batch_size(batch_size: int, calibration: Calibration, tokens: int = FORWARD_TOKENS) -> int:
    """`batch_size` capped so one forward holds at most `tokens` tokens (at least one sequence).

    A block's activations, not its weights, set the calibration peak: 8 sequences of 512 tokens
    through a Qwen2.5-0.5B MLP are [4096, 9728] fp32 (160 MB) for gate_up alone, plus the SiLU
    product and the |x| of each input for the statistics. Sums over fewer tokens at a time reach
    the same statistics (up to float summation order)."""
    items = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration or [])
    seq = max((t.shape[-1] for t in items if isinstance(t, torch.Tensor) and t.dim()), default=1)
    return max(1, min(batch_size, tokens // max(seq, 1)))


def model_device(model: nn.Module) -> torch.device:
    """Where the weights are (a lazily loaded model's layers not read yet are on "meta": skipped)."""
    p = next((p for p in model.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def run_model(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, whether forward returns a tensor or an object with `.logits` (HF)."""
    out = model(ids)
    return getattr(out, "logits", out)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockHooks:
    """Streaming (compress/stream.py): `before(j)` makes block j's weights real (and applies recipe
    stages that come before this one), `after(j)` runs once the hidden states have passed through it
    (later stages). With hooks every block is walked, from block 0."""

    before: Callable[[int], None]
    after: Callable[[int], None]


def trim_heap() -> None:
    """Hand freed heap pages back to the OS: glibc keeps freed chunks below its mmap threshold in its
    arenas, so a layer's transient float copies and GPTQ's temporaries would stay resident (measured:
    RSS grew ~10 MB per layer beyond the compressed bytes without this when streaming)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_mb() -> float:
    """Resident memory of this process now, MB (for progress bars; peaks are measured elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclass
class Scope:
    """A part of the model whose target Linears are quantized together: one block, or the whole model.
    `run()` pushes every calibration batch through it; `run_first()` returns the output for batch 0."""

    module: nn.Module
    names: list[str]  # model-level names of the target Linears inside
    run: Callable[[], None]
    run_first: Callable[[], torch.Tensor]


def _find_blocks(model: nn.Module, names: list[str]) -> tuple[str, list[nn.Module]] | None:
    """The first ModuleList/Sequential with ≥2 children holding targets (decoder layers, BERT's
    encoder.layer, or a plain Sequential MLP). Its children must run one after another on a hidden state
    passed as the first positional argument (or `hidden_states=`)."""
    for cname, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2:
            pre = f"{cname}." if cname else ""
            held = sum(
                any(n == f"{pre}{i}" or n.startswith(f"{pre}{i}.") for n in names) for i in range(len(mod))
            )
            if held >= 2:
                return pre, list(mod)
    return None


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


class _Stop(Exception):
    pass


def iter_scopes(
    model: nn.Module,
    names: list[str],
    calibration: Calibration,
    batch_size: int,
    progress: bool = True,
    desc: str = "quantize",
    hooks: BlockHooks | None = None,
) -> Iterator[Scope]:
    """Yield scopes in forward order. Resuming the generator after a scope's Linears were replaced
    advances the cached hidden states through the (now quantized) block."""
    batches = to_batches(calibration, batch_size, model_device(model))
    found = _find_blocks(model, names)
    if hooks is not None and found is None:
        raise LeanformerError("streaming calibration needs the model's decoder layers to hold the targets")
    remaining = list(names)
    if found is not None:
        pre, blocks = found
        owned = [
            [n for n in names if n == f"{pre}{i}" or n.startswith(f"{pre}{i}.")] for i in range(len(blocks))
        ]
        start = 0 if hooks else next(i for i, o in enumerate(owned) if o)
        stop = len(blocks) if hooks else max(i for i, o in enumerate(owned) if o) + 1
        # streaming keeps the hidden states in a temporary file (compress/spill.py): with the weights
        # read a layer at a time they were the largest item left (235 MB for Qwen2.5-0.5B, 128 x 512)
        spill = hooks is not None and batches[0].device.type == "cpu"
        hidden, rec = _capture_block_inputs(model, blocks[start], batches, SpilledStates() if spill else [])
        bar = tqdm(range(start, stop), desc=desc, unit="layer", disable=not progress)
        for j in bar:
            block = blocks[j]
            if hooks:
                hooks.before(j)
                block = blocks[j]  # the hook may have swapped modules inside; the block is the same

            def replay(b: int, block=block) -> torch.Tensor:
                args, kwargs, key = rec[b]
                if key is None:
                    return _first(block(hidden[b], *args, **kwargs))
                return _first(block(*args, **{**kwargs, key: hidden[b]}))

            def run_all(replay=replay) -> None:
                for b in range(len(batches)):
                    replay(b)

            if owned[j]:
                yield Scope(block, owned[j], run_all, lambda replay=replay: replay(0))
            with torch.no_grad():
                for b in range(len(batches)):  # one batch at a time: no second copy of all of them
                    hidden[b] = replay(b)
            if hooks:
                hooks.after(j)
            bar.set_postfix(rss=f"{rss_mb():.0f} MB", refresh=False)
        if isinstance(hidden, SpilledStates):
            hidden.close()
        remaining = [n for n in names if not any(n in o for o in owned)]
    if remaining:  # Linears outside the blocks (or no blocks found): one scope over the whole model

        def run_full() -> None:
            for ids in batches:
                run_model(model, ids)

        yield Scope(model, remaining, run_full, lambda: run_model(model, batches[0]))


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[torch.Tensor], hidden: list | SpilledStates
) -> tuple[list[torch.Tensor] | SpilledStates, list[tuple]]:
    """One forward per batch, stopped by a pre-hook on `block`: the hidden state entering it and its
    other args/kwargs (masks, positions, rotary tables) as (args, kwargs, key) per batch: key None means
    the hidden state is the first positional argument, else the kwarg name. Every block of a decoder
    stack is called with the same other arguments, so they serve all the blocks after it. The hidden
    states go into `hidden` (a list, or a SpilledStates file)."""
    calls: list[tuple] = []

    def hook(_mod, args, kwargs):
        if args:
            h, rec = args[0], (args[1:], kwargs, None)
        else:
            key = next((k for k in ("hidden_states", "x", "hidden", "input") if k in kwargs), None)
            if key is None:
                raise LeanformerError(
                    "cannot find the hidden-state argument of a model block for calibration"
                )
            h, rec = kwargs[key], ((), {k: v for k, v in kwargs.items() if k != key}, key)
        for k in _CACHE_KWARGS:  # replaying must not append to (or attend over) a KV cache
            if rec[1].get(k) is not None:
                rec = (rec[0], {**rec[1], k: None}, rec[2])
        if rec[1].get("use_cache"):
            rec = (rec[0], {**rec[1], "use_cache": False}, rec[2])
        calls.append(rec)
        hidden.append(h.detach())
        raise _Stop  # nothing from this block on is needed

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                with contextlib.suppress(_Stop):
                    run_model(model, ids)
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise LeanformerError("model blocks were not called once per forward; cannot calibrate sequentially")
    return hidden, calls


# ------------------------------------------------------------------------------------- statistics


@dataclass
class InputStats:
    """Statistics of one distinct Linear input (Linears reading the very same tensor share one)."""

    names: list[str]  # the Linears reading this input; names[0] accumulated it
    gram: torch.Tensor  # fp32 [K, K]: sum over tokens of x^T x
    abs_sum: torch.Tensor  # fp32 [K]: sum over tokens of |x|
    count: int = 0  # tokens seen
    producer: nn.Module | None = None  # module with a 1-D weight (a norm) whose output this input is
    extra: dict = field(default_factory=dict)

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n * X^T X."""
        return self.gram * (2.0 / max(self.count, 1))

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def collect_stats(model: nn.Module, scope: Scope, producers: bool = False) -> list[InputStats]:
    """Replay the scope once with hooks; return one InputStats per distinct input tensor. With
    `producers`, also note which 1-D-weight module (RMSNorm/LayerNorm) produced each input."""
    mods = dict(model.named_modules())
    stats: dict[str, InputStats] = {}
    alias: dict[str, str] = {}  # Linear name -> name whose stats it shares (decided on batch 0)
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(tensor) -> (linear, tensor) within one batch
    made_by: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    first_batch = [True]
    handles = []

    def pre_hook(name: str):
        def hook(_mod, args):
            x = args[0]
            if first_batch[0]:
                if id(x) in seen and seen[id(x)][1] is x:
                    alias[name] = seen[id(x)][0]
                    stats[alias[name]].names.append(name)
                    return
                seen[id(x)] = (name, x)
                k = x.shape[-1]
                st = InputStats([name], torch.zeros(k, k, device=x.device), torch.zeros(k, device=x.device))
                if id(x) in made_by and made_by[id(x)][1] is x:
                    st.producer = made_by[id(x)][0]
                stats[name] = st
            elif name in alias:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            st = stats[name]
            st.gram.addmm_(x2.t(), x2)
            st.abs_sum += x2.abs().sum(0)
            st.count += x2.shape[0]

        return hook

    def out_hook(mod, _args, out):
        if first_batch[0] and isinstance(out, torch.Tensor):
            made_by[id(out)] = (mod, out)

    for n in scope.names:
        handles.append(mods[n].register_forward_pre_hook(pre_hook(n)))
    if producers:
        for m in scope.module.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1:
                handles.append(m.register_forward_hook(out_hook))

    def end_first_batch(_mod, _args, _out):
        first_batch[0] = False
        seen.clear()
        made_by.clear()

    handles.append(scope.module.register_forward_hook(end_first_batch))
    try:
        with torch.no_grad():
            scope.run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in scope.names if n not in stats and n not in alias]
    if missing:
        raise LeanformerError(f"calibration forward never reached {missing[0]}")
    return list(stats.values())
