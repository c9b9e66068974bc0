"""The fused decode step: a Llama-family model's whole layer stack for one new token per row in one
C++ call (kernels/decode.cpp), on CPU fp32 activations.

Why: at batch 1 a small model's decode step is mostly overhead, not matmul (SmolLM2 int4: ~2.8 ms
of ~7.4 ms per token in the GEMV kernels; the rest is ~40 torch ops and ~10 module calls per layer).
The C++ step runs the same GEMV kernels the modules call, with norms, RoPE, the KV-cache write,
attention and the residuals in between, so results match the module path to float rounding.

`DecodePlan.get(model)` builds the C++ stack from the modules once and rebuilds it when a module or a
tensor was swapped (quantize_, pruning, load_state_dict(assign=True)) or the model moved (.to()). Layers it cannot
run (another Linear type, non-fp32 weights, ...) make the model keep the module path.

Activations of the quantized Linears: `model.decode_activations` (set it with `set_decode_activations`)
is "fp32" (fp32 activations, the module path's math), "int8" (each Linear input quantized to int8 per
block of 32 columns once, q/k/v and gate/up sharing it as one fused Linear, then integer dot products:
kernels/gemv_i8.cpp) or "auto" (the default: `AUTO_INT8` says where int8 was measured faster at equal
quality; kernels/cpu.py). fp32 Linears (unquantized layers) always take fp32 activations. An Int8Linear LM head (GGUF
Q8_0's tied embedding, head-int8 recipes) follows the same choice for the rows the fused step decodes.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer import kernels
from leanformer.errors import LeanformerError
from leanformer.kernels.cpu import ACTIVATIONS
from leanformer.kernels.cpu import int8_activations as _int8_mode
from leanformer.kernels.modules import MAX_ROWS, FastLinear
from leanformer.models.huge_pages import to_huge_pages
from leanformer.models.layers import RMSNorm


def set_decode_activations(model: nn.Module, activations: str) -> None:
    """Make the fused decode step run the model's int4/int8 Linears on "int8" or "fp32" activations,
    or "auto" (int8 where AUTO_INT8 has this CPU's instruction set)."""
    if activations not in ACTIVATIONS:
        raise LeanformerError(
            f"decode activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}"
        )
    model.decode_activations = activations


def int8_activations(model: nn.Module) -> bool:
    """Whether the fused step runs this model's quantized Linears on int8 activations now."""
    mode = getattr(model, "decode_activations", "auto")
    if mode not in ACTIVATIONS:
        raise LeanformerError(
            f"model.decode_activations must be one of {', '.join(ACTIVATIONS)}, got {mode!r}"
            " (set it with leanformer.models.fused.set_decode_activations)"
        )
    return _int8_mode(mode)


def set_head_activations(model: nn.Module, fused: bool) -> None:
    """Before the LM head runs: an Int8Linear / Int5Linear head takes the layers' int8 activations on the
    rows the fused step just decoded, and fp32 activations everywhere else (prefill, scoring). Set on
    every forward, so a prefill gives the same logits before and after the first decode step."""
    head = getattr(model, "lm_head", None)
    if hasattr(head, "int8_activations"):
        head.int8_activations = fused and int8_activations(model)


def _linear(module: nn.Module):
    """kernels' DecodeLinear for a Linear-like module, or None if the fused step cannot run it."""
    ext = kernels.ext()
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().contiguous()
    operands = getattr(module, "decode_operands", None)
    if operands is not None:  # a quantized Linear (compress/qbase.py)
        ops = operands()
        if ops is None or ops[1].device.type != "cpu":
            return None
        kind, codes, scales, zeros, group, k_padded, *lut = ops  # lut: int4 with 8-bit scale codes
        scale = module.input_scale
        return ext.DecodeLinear(kind, codes, scales, zeros, bias, scale, group, k_padded, *lut)
    w = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or w is None or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    return ext.DecodeLinear("f32", w.detach().contiguous(), None, None, bias, None, 0, 0)


_NAMES = (
    ("input_layernorm",),
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("post_attention_layernorm",),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
)


def _layer_modules(block: nn.Module) -> list[nn.Module]:
    return [block.get_submodule(".".join(path)) for path in _NAMES]


def _identity(model: nn.Module) -> list[tuple[dict, str, object]]:
    """(container, name, object) for every module and tensor the stack captures: the stack is valid
    while each container still holds that very object (checked per step by kernels' ObjectIdentity,
    kernels/identity.cpp: ~120 µs for SmolLM2's 757 entries in a decode loop, where each dict misses the
    caches; the same test as a Python generator took ~180-260 µs, a walk through nn.Module.__getattr__
    more)."""
    layers = model.model.layers
    # the containers above the layers too: a new layer list (PruneLayers) or backbone replaces them whole
    out: list[tuple[dict, str, object]] = [
        (model._modules, "model", model.model),
        (model.model._modules, "layers", layers),
    ]
    for i, block in enumerate(layers):
        out.append((layers._modules, str(i), block))
        for path in _NAMES:
            parent = block
            for name in path:
                child = parent._modules[name]
                out.append((parent._modules, name, child))
                parent = child
            for store in (parent._parameters, parent._buffers):
                out.extend((store, name, t) for name, t in store.items() if t is not None)
    out += _module_entries(model.model._modules, "embed_tokens", model.model.embed_tokens)
    out += _module_entries(model.model._modules, "norm", model.model.norm)
    out += _module_entries(model._modules, "lm_head", model.lm_head)
    return out


def _module_entries(container: dict, name: str, module: nn.Module) -> list[tuple[dict, str, object]]:
    """_identity's entries for a module and every tensor it holds, its children's included."""
    out: list[tuple[dict, str, object]] = [(container, name, module)]
    for m in module.modules():
        out.extend((m._modules, n, c) for n, c in m._modules.items())
        for store in (m._parameters, m._buffers):
            out.extend((store, n, t) for n, t in store.items() if t is not None)
    return out


def _ends(model: nn.Module) -> tuple | None:
    """DecodeStack.set_ends' operands (embedding, its scales and group, final norm weight, eps, head,
    whether the head takes int8 activations after a fused step), or None when one of them would not run
    the kernel the module itself calls: an fp32 nn.Embedding or an int8 / bf16 / fp16 QuantEmbedding
    (compress/layout.py), an RMSNorm with fp32 weights, a quantized head or an fp32 FastLinear head (whose
    forward calls linear_f32 on every row count the step decodes; a plain nn.Linear head goes through
    F.linear, which the C++ step does not call)."""
    emb, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
    if not isinstance(norm, RMSNorm) or norm.weight.dtype != torch.float32 or not norm.weight.is_cpu:
        return None
    if isinstance(emb, nn.Embedding):
        w = emb.weight
        if w.dtype != torch.float32 or not w.is_cpu or emb.max_norm is not None:
            return None
        table = (w.detach(), None, 0)
    else:
        source, probe = getattr(emb, "source", None), getattr(emb, "_dtype_probe", None)
        ops = getattr(source(), "decode_operands", lambda: None)() if source is not None else None
        if (
            ops is None
            or probe is None
            or probe.dtype != torch.float32
            or ops[0] not in ("q8", "bf16", "f16")
            or not ops[1].is_cpu
        ):
            return None
        table = (ops[1], ops[2], ops[4])
    lin = _linear(head) if hasattr(head, "decode_operands") or _kernel_head(head) else None
    if lin is None:
        return None
    return (*table, norm.weight.detach(), norm.eps, lin, hasattr(head, "int8_activations"))


def _kernel_head(head: nn.Module) -> bool:
    """An fp32 head whose own forward runs kernels' linear_f32 on the fused step's rows (the DecodeLinear
    "f32" kernel: same logits). SmolLM2 fp32's tied head is 113 MB a token: in the C++ call, no module
    call and Python in between (1.05x decode measured)."""
    return type(head) is FastLinear and head.max_rows >= MAX_ROWS


def arm_tokens(model: nn.Module, stack) -> None:
    """Before ids-to-logits steps: the stack's int8 decision, and the head module told the same (what it
    would take on these rows, set_head_activations), so the two stay coherent."""
    stack.int8_act = int8_activations(model)
    head = model.lm_head
    if hasattr(head, "int8_activations"):
        head.int8_activations = stack.int8_act


def _heads(block: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one layer: per layer, since head pruning
    (compress/prune_heads.py) leaves layers with different query-head counts."""
    attn = block.self_attn
    return attn.n_heads, attn.n_kv_heads, attn.head_dim


def _build(model: nn.Module):
    stack = kernels.ext().DecodeStack()
    for block in model.model.layers:
        n1, qkv, o, n2, gate_up, down = _layer_modules(block)
        linears = [_linear(m) for m in (qkv, o, gate_up, down)]
        norms = (n1.weight, n2.weight)
        if any(lin is None for lin in linears) or any(
            w.dtype != torch.float32 or not w.is_cpu for w in norms
        ):
            return None
        stack.add(
            n1.weight.detach(), n1.eps, linears[0], linears[1], n2.weight.detach(), n2.eps, linears[2], linears[3],
            *_heads(block),
        )  # fmt: skip
    ends = _ends(model)
    if ends is not None:
        stack.set_ends(*ends)
    return stack


class _Segment:
    """Layers [start, end) of a model that fuses only in part (e.g. LowRankLinear MLPs): a C++ stack
    whose last layer may carry a zero MLP (`mlp_block`: that block's real MLP then runs in torch), or
    (stack None) one block on the module path."""

    def __init__(self, stack, start: int, block: nn.Module | None = None) -> None:
        self.stack, self.start, self.end, self.mlp_block = stack, start, start + 1, None
        self.block = block  # the module-path block when stack is None


def _zero_mlp(hidden: int) -> tuple:
    """gate_up / down DecodeLinears of width 1 and all zeros: silu(0) * 0 = 0, so the C++ layer adds
    exactly 0 and the real MLP runs in torch after it."""
    ext = kernels.ext()
    return (
        ext.DecodeLinear("f32", torch.zeros(2, hidden), None, None, None, None, 0, 0),
        ext.DecodeLinear("f32", torch.zeros(hidden, 1), None, None, None, None, 0, 0),
    )


def _segments(model: nn.Module) -> list[_Segment] | None:
    """The layers in runs the C++ step can take: whole layers, or the attention half of a layer whose
    MLP it cannot run (LowRankLinear, ...), the MLP then in torch; other layers on the module path.
    None when no layer's attention can be fused."""
    a, out, open_run = model.args, [], None
    for i, block in enumerate(model.model.layers):
        n1, qkv, o, n2, gate_up, down = _layer_modules(block)
        attn = [_linear(m) for m in (qkv, o)]
        if any(lin is None for lin in attn) or any(
            w.dtype != torch.float32 or not w.is_cpu for w in (n1.weight, n2.weight)
        ):
            out.append(_Segment(None, i, block))
            open_run = None
            continue
        mlp = [_linear(m) for m in (gate_up, down)]
        torch_mlp = any(lin is None for lin in mlp)
        if torch_mlp:
            mlp = _zero_mlp(a.hidden_size)
        if open_run is None:
            open_run = _Segment(kernels.ext().DecodeStack(), i)
            out.append(open_run)
        open_run.stack.add(
            n1.weight.detach(), n1.eps, attn[0], attn[1], n2.weight.detach(), n2.eps, mlp[0], mlp[1],
            *_heads(block),
        )  # fmt: skip
        open_run.end = i + 1
        if torch_mlp:
            open_run.mlp_block, open_run = block, None
    return out if any(seg.stack is not None for seg in out) else None


def _pool_rows(cache) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A paged cache's (read, write) pool rows for this step (models/paged_cache.py); (None, None) for
    slot-major caches, which the C++ step indexes by slot and position."""
    rows = getattr(cache, "fused_rows", None)
    return rows() if rows is not None else (None, None)


class DecodePlan:
    """A model's built C++ decode stack and the key it was built for. Not copied by deepcopy/pickle
    (the C++ object holds the model's tensors): a copy builds its own on first use."""

    def __init__(self) -> None:
        self.identity = None  # kernels' ObjectIdentity over _identity(model) when the stack was built
        self.stack = None
        self.segments: list[_Segment] | None = None  # when only part of the model fuses

    def reset(self) -> None:
        """Forget the stack (Model._apply calls this: .to() swaps tensor storage under the same objects)."""
        self.identity, self.stack, self.segments = None, None, None

    def __deepcopy__(self, memo: dict) -> DecodePlan:
        return DecodePlan()

    def __reduce__(self):
        return (DecodePlan, ())

    @staticmethod
    def usable(model: nn.Module, x: torch.Tensor, cache) -> bool:
        """Whether this forward may take the fused step (x [B, 1, hidden] embeddings)."""
        return (
            model.fused_decode
            and x.shape[1] == 1
            and x.shape[0] <= getattr(cache, "max_fused_rows", MAX_ROWS)
            and x.dtype == torch.float32
            and x.is_cpu
            and not torch.is_grad_enabled()
            and getattr(cache, "fused_layout", True)  # e.g. a paged cache's multi-token step
            and cache.dtype == torch.float32
            and cache.k[0].is_cpu
            and not kernels.tracing()
            and kernels.available()
        )

    @staticmethod
    def usable_tokens(model: nn.Module, ids: torch.Tensor, cache) -> bool:
        """Whether a forward of ids [B, 1] may run from ids to logits in one C++ call (run_tokens)."""
        return (
            model.fused_decode
            and ids.dim() == 2
            and ids.shape[1] == 1
            and 0 < ids.shape[0] <= getattr(cache, "max_fused_rows", MAX_ROWS)
            and ids.is_cpu
            and not torch.is_grad_enabled()
            and getattr(cache, "fused_layout", True)
            and cache.dtype == torch.float32
            and cache.k[0].is_cpu
            and not kernels.tracing()
            and kernels.available()
            and not any(
                kernels.hooked(m) for m in (model.model.embed_tokens, model.model.norm, model.lm_head)
            )
        )

    def run_tokens(self, model: nn.Module, ids: torch.Tensor, rope, cache, step) -> torch.Tensor | None:
        """Logits [B, 1, vocab] for ids [B, 1]: embedding, all layers, final norm and head in one C++
        call (the same kernels as the module path, so the same logits), or None to take the other paths
        (a model whose embedding, norm or head the stack does not hold, or that fuses only in part).
        A stack last built without ends is not re-checked here: the other path's get() does that once,
        and a rebuilt stack with ends is taken from the next step on."""
        if self.stack is None or not self.stack.has_ends:
            return None
        stack = self.get(model)
        if stack is None or not stack.has_ends:
            return None
        arm_tokens(model, stack)
        b = ids.shape[0]
        cos, sin = rope  # [B, 1, 1, D] each
        read, write = _pool_rows(cache)
        keep = getattr(cache, "logit_rows", None)  # a chained prefill's view: only these rows' logits
        logits = stack.forward_tokens(
            ids.view(-1), cos.reshape(b, -1), sin.reshape(b, -1), cache.k, cache.v, cache.k_scale, cache.v_scale,
            step.slots, step.positions.view(-1), read, write, keep,
        )  # fmt: skip
        return logits.view(logits.shape[0], 1, -1)

    def get(self, model: nn.Module):
        """The C++ stack for the model as it is now, or None if some layer cannot be fused."""
        if self.identity is None or not self.identity.holds():
            to_huge_pages(model)  # before the stack captures the tensors' addresses (what is new only)
            self.stack, self.identity = _build(model), kernels.ext().ObjectIdentity(_identity(model))
            self.segments = _segments(model) if self.stack is None else None
        return self.stack

    def run(self, model: nn.Module, x: torch.Tensor, rope, cache, step) -> torch.Tensor | None:
        """All layers for x [B, 1, hidden] -> [B, 1, hidden], or None to use the module path."""
        stack = self.get(model)
        if stack is None and self.segments is None:
            return None
        if stack is None:
            return self._run_segments(model, x, rope, cache, step)
        stack.int8_act = int8_activations(model)
        b = x.shape[0]
        cos, sin = rope  # [B, 1, 1, D] each
        read, write = _pool_rows(cache)
        y = stack.forward(
            x.view(b, -1), cos.reshape(b, -1), sin.reshape(b, -1), cache.k, cache.v, cache.k_scale, cache.v_scale,
            step.slots, step.positions.view(-1), read, write,
        )  # fmt: skip
        return y.view(b, 1, -1)

    def _run_segments(self, model: nn.Module, x: torch.Tensor, rope, cache, step) -> torch.Tensor:
        """run() for a model that fuses in part: each run of layers in its own C++ call on its slice of
        the cache, the rest through the modules, in layer order."""
        b, int8 = x.shape[0], int8_activations(model)
        cos, sin = (t.reshape(b, -1) for t in rope)
        pos = step.positions.view(-1)
        read, write = _pool_rows(cache)
        for seg in self.segments:
            if seg.stack is None:
                x = seg.block(x, rope, cache, step)
                continue
            seg.stack.int8_act = int8
            ks, vs = cache.k_scale[seg.start : seg.end], cache.v_scale[seg.start : seg.end]
            y = seg.stack.forward(
                x.reshape(b, -1), cos, sin, cache.k[seg.start : seg.end], cache.v[seg.start : seg.end], ks, vs,
                step.slots, pos, read, write,
            )  # fmt: skip
            x = y.view(b, 1, -1)
            if seg.mlp_block is not None:  # the MLP the C++ layer left out (zero there)
                x = x + seg.mlp_block.mlp(seg.mlp_block.post_attention_layernorm(x))
        return x
