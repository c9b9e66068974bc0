"""Quantization configs: flat, serializable dataclasses (`to_dict()` / `QuantConfig.from_dict()` with a
"type" key), each naming the nn.Linear modules it applies to with `targets` / `ignore` patterns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from leanformer.compress.kernels import INT4_GROUP_SIZES
from leanformer.errors import LeanformerError

DEFAULT_IGNORE = ("lm_head",)
CONFIG_TYPES: dict[str, type[QuantConfig]] = {}


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

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise LeanformerError(f"GPTQ: bits must be 4 or 8, got {self.bits}")
        if self.bits == 4:
            _check_int4(self)
        if not 0 <= self.damp < 1:
            raise LeanformerError(f"GPTQ: damp must be in [0, 1), got {self.damp}")


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

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise LeanformerError(f"AWQ: bits must be 4 or 8, got {self.bits}")
        if self.bits == 4:
            _check_int4(self)


@_register
@dataclass
class KVCache(QuantConfig):
    """Store the generation KV cache as int8 (one scale per token and head): 4× less cache memory than
    fp32. It quantizes no Linear; `targets`/`ignore` are unused. Evaluation scores such a model through
    its cache, so perplexity shows the cost."""

    dtype: str = "int8"

    def validate(self) -> None:
        if self.dtype != "int8":
            raise LeanformerError(f"KVCache: dtype must be 'int8', got {self.dtype!r}")
