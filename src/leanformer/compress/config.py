"""Quantization configs: flat, serializable dataclasses (`to_dict()` / `QuantConfig.from_dict()` with a
"type" key), each naming the nn.Linear modules it applies to with `targets` / `ignore` patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from leanformer.compress.kernels import INT4_GROUP_SIZES
from leanformer.errors import LeanformerError

DEFAULT_IGNORE = ("lm_head",)
CONFIG_TYPES: dict[str, type[QuantConfig]] = {}


def matches(name: str, patterns: Iterable[str]) -> bool:
    """A glob, or "re:<regex>", matched against the full dotted name or any dotted suffix of it."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name) or re.search(rf"(?:^|\.)(?:{p[3:]})$", name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return True
    return False


def _register(cls: type) -> type:
    CONFIG_TYPES[cls.__name__] = cls
    return cls


@dataclass
class QuantConfig:
    """Base of every config: which nn.Linear modules (by qualified name) it applies to. A pattern is a
    glob (fnmatch) or, prefixed "re:", a regex; it matches a name or any dotted suffix of it, so
    "lm_head" matches "model.lm_head" and "mlp.*" matches "model.layers.3.mlp.down_proj"."""

    targets: list[str] = field(default_factory=lambda: ["*"], kw_only=True)
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE), kw_only=True)
    needs_calibration: ClassVar[bool] = False  # the CLI asks for --calibration when a stage says so

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> QuantConfig:
        d = dict(d)
        name = d.pop("type", None)
        if name not in CONFIG_TYPES:
            raise LeanformerError(f"unknown config type {name!r}; known: {', '.join(sorted(CONFIG_TYPES))}")
        cls = CONFIG_TYPES[name]
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise LeanformerError(
                f"{name} has no field(s) {', '.join(extra)}; fields: {', '.join(sorted(known))}"
            )
        return cls(**d)

    def validate(self) -> None:
        """Checks that need no model; shape checks happen per module when applied."""
        for attr in ("targets", "ignore"):
            v = getattr(self, attr)
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise LeanformerError(f"{type(self).__name__}.{attr} must be a list of patterns, got {v!r}")


def _check_int4(cfg: QuantConfig) -> None:
    if cfg.group_size not in INT4_GROUP_SIZES:
        raise LeanformerError(
            f"{type(cfg).__name__}: group_size must be one of {INT4_GROUP_SIZES}, got {cfg.group_size}"
        )


@_register
@dataclass
class Int8WeightOnly(QuantConfig):
    """int8 weights, symmetric per output channel (Int8Linear; compute paths in qbase.py)."""


@_register
@dataclass
class BF16WeightOnly(QuantConfig):
    """bfloat16 weights, fp32 activations and math (BF16Linear): half the bytes of fp32, lossless for a
    checkpoint shipped in bf16."""


@_register
@dataclass
class F16WeightOnly(QuantConfig):
    """IEEE float16 weights, fp32 activations and math (F16Linear): half the bytes of fp32, lossless for a
    checkpoint shipped in fp16 (3 more mantissa bits than bf16, 5 fewer exponent bits)."""


@_register
@dataclass
class Int4WeightOnly(QuantConfig):
    """int4 weights, round-to-nearest, asymmetric per group of `group_size` input columns. `pad` lets a
    group size that does not divide in_features work by zero-padding (costs bits and a pad per call)."""

    group_size: int = 128
    pad: bool = False
    scale_bits: int | None = None  # 8: scales/zeros stored as 8-bit codes (compress/double_quant.py)

    def validate(self) -> None:
        super().validate()
        _check_int4(self)
        if self.scale_bits not in (None, 8):
            raise LeanformerError(f"Int4WeightOnly: scale_bits must be None or 8, got {self.scale_bits}")


@_register
@dataclass
class Int8Dynamic(QuantConfig):
    """int8 weights (per channel) x int8 activations quantized per token at run time (oneDNN int8 GEMM).
    For encoders and prefill; calls with fewer than `min_tokens` rows use the weight-only int8 kernel,
    which is faster at decode sizes."""

    min_tokens: int = 16


@_register
@dataclass
class GPTQ(QuantConfig):
    """GPTQ (Frantar et al. 2022): integer values chosen column by column with Hessian-weighted error
    feedback from calibration inputs. bits=4 -> group-wise Int4Linear, bits=8 -> per-channel Int8Linear."""

    bits: int = 4
    group_size: int = 128
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool = True  # columns by decreasing H diagonal; groups stay static so kernels still fit
    block_size: int = 128  # columns per lazy-update block
    batch_size: int = 8  # calibration sequences per forward
    pad: bool = False
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise LeanformerError(f"GPTQ: bits must be 4 or 8, got {self.bits}")
        if self.bits == 4:
            _check_int4(self)
        _check_damp(self.damp, "GPTQ")


@_register
@dataclass
class AWQ(QuantConfig):
    """AWQ (Lin et al. 2023): per-input-channel scales s = mean|x|^alpha (alpha grid-searched to minimize
    the layer's output error) protect salient channels; 1/s is folded into a preceding norm when the
    Linear reads a norm's output, else kept as a per-channel input multiply inside the module."""

    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    clip: bool = True  # search per-group range shrink factors too (ignored with gptq)
    gptq: bool = False  # choose the integers of the scaled weights with GPTQ instead of round-to-nearest
    damp: float = 0.01  # GPTQ dampening, used with gptq=True
    max_tokens: int = 4096  # calibration rows kept per Linear for the searches
    batch_size: int = 8
    pad: bool = False
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise LeanformerError(f"AWQ: bits must be 4 or 8, got {self.bits}")
        if self.bits == 4:
            _check_int4(self)


@_register
@dataclass
class KVCache(QuantConfig):
    """Store the generation KV cache as int8 (one scale per token and head: 4× less cache memory than
    fp32) or fp16 (2× less; llama.cpp's default KV type). It quantizes no Linear; `targets`/`ignore`
    are unused. Evaluation scores such a model through its cache, so perplexity shows the cost."""

    dtype: str = "int8"

    def validate(self) -> None:
        if self.dtype not in ("int8", "fp16"):
            raise LeanformerError(f"KVCache: dtype must be 'int8' or 'fp16', got {self.dtype!r}")


# ------------------------------------------------------------------------------------------- pruning

PRUNE_PATTERNS = ("unstructured", "2:4", "4:8")  # the named ones; any "N:M" with 0 < N < M parses


def parse_pattern(pattern: str, who: str) -> tuple[int, int] | None:
    """ "unstructured" -> None; "N:M" (keep N of every M consecutive input weights) -> (N, M)."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise LeanformerError(f"{who}: pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise LeanformerError(f"{who}: N:M pattern needs 0 < N < M (keep N of every M), got {pattern!r}")
    return n, m


def _check_damp(value: float, who: str) -> None:
    """The Hessian dampening fraction (GPTQ, SparseGPT, the least-squares refits, whitened SVD)."""
    if not 0 <= value < 1:
        raise LeanformerError(f"{who}: damp must be in [0, 1), got {value}")


def _check_fraction(value: object, who: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LeanformerError(f"{who}: {what} must be a number in [0, 1), got {value!r}")


def _check_count(value: object, who: str, what: str, meaning: str = "") -> None:
    """A positive int (bools refused); `meaning` is added in brackets to the error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        note = f" ({meaning})" if meaning else ""
        raise LeanformerError(f"{who}: {what} must be a positive integer{note}, got {value!r}")


@dataclass
class PruneConfig(QuantConfig):
    """Base of the unstructured / N:M pruning configs: the targeted Linears stay float nn.Linear with
    zeros in them (so a later quantization stage still sees them). `sparsity` is the fraction of each
    row's weights set to zero, or a dict {pattern: sparsity} (first matching pattern wins; targeted
    Linears matching none stay dense). An N:M pattern implies sparsity 1 - N/M."""

    sparsity: float | dict[str, float] = 0.5
    pattern: str = "unstructured"

    def validate(self) -> None:
        super().validate()
        who = type(self).__name__
        nm = parse_pattern(self.pattern, who)
        values = self.sparsity.values() if isinstance(self.sparsity, dict) else [self.sparsity]
        if isinstance(self.sparsity, dict) and not all(isinstance(k, str) for k in self.sparsity):
            raise LeanformerError(f"{who}: sparsity dict keys must be name patterns, got {self.sparsity!r}")
        for v in values:
            _check_fraction(v, who, "sparsity")
        if nm is not None and any(abs(v - (1 - nm[0] / nm[1])) > 1e-9 for v in values):
            raise LeanformerError(
                f"{who}: pattern {self.pattern} means sparsity {1 - nm[0] / nm[1]:g}, got {self.sparsity!r}"
            )


@_register
@dataclass
class Magnitude(PruneConfig):
    """Zero the smallest |W| of each output row (or of each group of M inputs for N:M). No calibration."""


@_register
@dataclass
class Wanda(PruneConfig):
    """Wanda (Sun et al. 2023): zero the smallest |W_ij| * ||X_j||_2 per output row, X the calibration
    inputs of the Linear (per-input-channel norms); no weight update."""

    batch_size: int = 8
    needs_calibration: ClassVar[bool] = True


@_register
@dataclass
class SparseGPT(PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): choose the mask by w^2 / [H^-1]_jj^2 over blocks of columns
    and update the surviving weights with the GPTQ error feedback (H = 2 X^T X / n, as GPTQ)."""

    damp: float = 0.01
    block_size: int = 128
    batch_size: int = 8
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        _check_damp(self.damp, "SparseGPT")
        if self.block_size < 1:
            raise LeanformerError(f"SparseGPT: block_size must be >= 1, got {self.block_size}")


@_register
@dataclass
class PruneFFN(QuantConfig):
    """Structured pruning that shrinks the model: remove `sparsity` of each decoder layer's FFN
    intermediate channels (gate/up rows + down columns), ranked by calibration importance
    ||a_j||_2 * ||W_down[:, j]||_2 (a = act(gate) * up). Kept widths are multiples of `multiple`;
    with `refit`, down_proj is least-squares refitted on the kept channels to the dense output.
    `targets`/`ignore` select down_proj Linears (which layers are pruned)."""

    sparsity: float = 0.25
    multiple: int = 32
    refit: bool = True
    damp: float = 0.01
    batch_size: int = 8
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        _check_fraction(self.sparsity, "PruneFFN", "sparsity")
        _check_count(self.multiple, "PruneFFN", "multiple")
        _check_damp(self.damp, "PruneFFN")


@_register
@dataclass
class PruneLayers(QuantConfig):
    """Remove the `n_layers` whole decoder layers with the lowest block influence (ShortGPT, Men et al.
    2024): 1 - mean cosine similarity between a layer's input and output hidden states on calibration
    text. The model's config records the new layer count. `targets`/`ignore` are unused."""

    n_layers: int = 1
    batch_size: int = 8
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        _check_count(self.n_layers, "PruneLayers", "n_layers")


@_register
@dataclass
class PruneHeads(QuantConfig):
    """Structured pruning of a Llama-family decoder's attention heads, respecting GQA: `sparsity` of the
    query heads of every KV group (each group of a layer keeps the same number, at least one, so the
    query/KV ratio stays integral), and `kv_sparsity` of the KV groups (a KV head with all its query
    heads: the KV cache shrinks too; the same count in every layer, so the cache keeps one shape).
    Fractions round to whole heads; `heads` / `kv_heads` give the kept counts per layer instead.
    Ranked by each head's calibration output energy ||W_o[:, h] a_h||_2 (what it adds to the residual
    stream); with `refit`, o_proj is least-squares refitted on the kept heads to the dense output.
    `targets`/`ignore` select o_proj Linears (which layers lose query heads; KV groups go in every layer)."""

    sparsity: float = 0.0
    kv_sparsity: float = 0.0
    heads: int | None = None
    kv_heads: int | None = None
    refit: bool = True
    damp: float = 0.01
    batch_size: int = 8
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        _check_fraction(self.sparsity, "PruneHeads", "sparsity")
        _check_fraction(self.kv_sparsity, "PruneHeads", "kv_sparsity")
        for what in ("heads", "kv_heads"):
            if getattr(self, what) is not None:
                _check_count(getattr(self, what), "PruneHeads", what, "heads kept per layer")
        _check_damp(self.damp, "PruneHeads")
        if not isinstance(self.refit, bool):
            raise LeanformerError(f"PruneHeads: refit must be true or false, got {self.refit!r}")
        if self.sparsity == 0 and self.kv_sparsity == 0 and self.heads is None and self.kv_heads is None:
            raise LeanformerError(
                "PruneHeads: nothing to prune; set sparsity, kv_sparsity, heads or kv_heads"
            )


@_register
@dataclass
class LowRank(QuantConfig):
    """Activation-aware low-rank factorisation (whitened SVD, as SVD-LLM): each targeted Linear W [N, K]
    becomes up(down(x)) with rank r = `ratio` * N K / (N + K) rounded down to a multiple of `multiple`
    (so `ratio` is the fraction of the Linear's parameters kept); the truncation minimizes the output
    error on calibration inputs. Speeds up only where r (N + K) < N K by enough to beat a second call, so
    keep="faster" times each shape (dense vs factorised, batch 1) and leaves a Linear dense unless its
    factorised form is measurably faster (the kept-dense names join `ignore`, so a reload rebuilds the
    same modules); keep="smaller" factorises every target. whiten=False is plain SVD (a baseline: it
    spends the rank on directions the inputs never excite)."""

    ratio: float = 0.5
    multiple: int = 32
    damp: float = 0.01
    batch_size: int = 8
    keep: str = "faster"
    whiten: bool = True
    needs_calibration: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise LeanformerError(f"LowRank: ratio must be in (0, 1), got {self.ratio!r}")
        _check_count(self.multiple, "LowRank", "multiple")
        _check_damp(self.damp, "LowRank")
        if self.keep not in ("faster", "smaller"):
            raise LeanformerError(f"LowRank: keep must be 'faster' or 'smaller', got {self.keep!r}")
        if not isinstance(self.whiten, bool):
            raise LeanformerError(f"LowRank: whiten must be true or false, got {self.whiten!r}")
