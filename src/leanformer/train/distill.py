"""Knowledge distillation: train a student to match a teacher (decoder LMs: logits; encoders: embeddings).

Loop per optimizer step: `grad_accum` micro-batches, each = the teacher's forward once under no_grad,
the student's forward + backward on the weighted losses (train/losses.py); then gradient clipping,
AdamW, and the learning rate of a linear warm-up followed by cosine decay to `min_lr_ratio` · lr.
bf16 autocast only where the hardware has native bf16 (a CUDA GPU that supports it; a CPU with the
avx512_bf16 / amx_bf16 flags): elsewhere emulated bf16 is slower than fp32. A CUDA GPU is used when present.
Checkpoints (train/checkpoint.py) every `checkpoint_every` steps and at the end; `resume=True` continues
from one exactly: the batches are a pure function of (seed, step) (train/data.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from leanformer.errors import LeanformerError
from leanformer.train import checkpoint as ck
from leanformer.train import losses as L
from leanformer.train.data import (
    Sentences,
    Windows,
    batch_indices,
    read_sentences,
    read_text,
    sentence_split,
    token_windows,
)
from leanformer.train.student import check_pair, default_mapping, is_encoder, plain_linears_


@dataclass
class DistillConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256  # decoder window / encoder truncation, tokens
    lr: float = 1e-4
    warmup: int | None = None  # None: 5% of the steps
    grad_accum: int = 1
    clip: float = 1.0  # max global gradient norm; 0 = off
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.1
    checkpoint_every: int = 0  # 0: only at the end (when a checkpoint path is given)
    eval_every: int = 0  # 0: only at the end
    seed: int = 0
    bf16: bool | None = None  # None: where native
    device: str | None = None  # None: cuda if available, else cpu
    weights: L.LossWeights | None = None  # None: the defaults for the model kind

    def validate(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LeanformerError(f"{name} must be a positive integer, got {v!r}")
        for name in ("checkpoint_every", "eval_every", "seed") + (
            ("warmup",) if self.warmup is not None else ()
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LeanformerError(f"{name} must be an integer ≥ 0, got {v!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise LeanformerError(f"lr must be a number in (0, 1), got {self.lr!r}")
        for name, hi in (("clip", float("inf")), ("weight_decay", 1.0), ("min_lr_ratio", 1.0)):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not 0 <= v <= hi
                or v == float("inf")
            ):
                raise LeanformerError(f"{name} must be a finite number in [0, {hi}], got {v!r}")
        if self.weights is not None:
            self.weights.validate()


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)  # per step, this run and the resumed part
    evals: list[dict] = field(default_factory=list)  # {"step": s, ...evaluate's figures}
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def default_weights(encoder: bool) -> L.LossWeights:
    return (
        L.LossWeights() if encoder else L.LossWeights(kl=1.0, ce=0.0, hidden=0.0, cosine=0.0, contrastive=0.0)
    )


def native_bf16(device: torch.device) -> bool:
    """bf16 autocast pays: CUDA with bf16 support, or a CPU whose bf16 GEMMs beat fp32 (AMX, AVX-512 BF16
    on AMD: kernels.cpu.bf16_pays)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from leanformer.kernels.cpu import bf16_pays

    return bf16_pays()


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to min_ratio at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_data(data, tok, encoder: bool, seq_len: int, exclude: str | None = None) -> Windows | Sentences:
    """A path, text, sentence list or token tensor [N, L] → Windows (decoders) / Sentences (encoders)."""
    if isinstance(data, (Windows, Sentences)):
        if isinstance(data, Sentences) != encoder:
            raise LeanformerError(
                "data kind does not fit the model: Sentences for encoders, Windows for decoders"
            )
        return data
    source = "the data"
    if isinstance(data, Path) or (
        isinstance(data, str) and "\n" not in data and Path(data).expanduser().is_file()
    ):
        source = f"data file {data}"
        if encoder:
            return sentence_split(read_sentences(data), source=source)
        data = read_text(data)
    if isinstance(data, torch.Tensor):
        if encoder or data.dim() != 2 or data.dtype != torch.long:
            raise LeanformerError("token data must be a LongTensor [N, seq_len] of windows, for a decoder")
        keep = max(1, min(4, len(data) // 10))
        if len(data) < 2:
            raise LeanformerError(f"{len(data)} token window(s): distillation needs at least 2")
        return Windows(data[:-keep], data[-keep:])
    if isinstance(data, (list, tuple)):
        if not all(isinstance(s, str) for s in data):
            raise LeanformerError("data must be a file path, a text, a list of sentences or token windows")
        return (
            sentence_split(list(data), source=source)
            if encoder
            else token_windows(tok, "\n".join(data), seq_len, exclude)
        )
    if not isinstance(data, str):
        raise LeanformerError(
            f"data must be a file path, a text, a list of sentences or token windows, got {type(data).__name__}"
        )
    if encoder:
        return sentence_split([s.strip() for s in data.split("\n") if s.strip()], source=source)
    return token_windows(tok, data, seq_len, exclude, source=source)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    tok,
    data,
    steps: int = 100,
    *,
    config: DistillConfig | None = None,
    mapping: list[int] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    evaluate: Callable[[nn.Module], dict] | None = None,
    exclude: str | None = None,
    callback: Callable[[int, float], None] | None = None,
    student_tok=None,
    progress: bool = True,
    **settings,
) -> DistillResult:
    """Train `student` (in place) to imitate `teacher`; returns the loss curve and evaluations.

    data: a text file / text (decoders: cut into windows of seq_len tokens; encoders: one sentence per
    line or a GLUE .tsv), a list of sentences, or token windows [N, seq_len]. `exclude`: text never to
    train on (the evaluation text). settings: any DistillConfig field (batch_size, lr, seq_len, ...) or
    LossWeights field (kl, ce, hidden, cosine, contrastive, temperature).
    evaluate(student) → dict of figures, run every eval_every steps and at the end (default: the loss on
    held-out data). checkpoint: a file path, written every checkpoint_every steps and at the end; with
    resume=True training continues from it (it must come from a run with the same settings and data).
    """
    cfg = config or DistillConfig()
    loss_keys = {k for k in settings if k in L.LossWeights.__dataclass_fields__}
    unknown = set(settings) - loss_keys - set(DistillConfig.__dataclass_fields__)
    if unknown:
        raise LeanformerError(f"distill: unknown setting(s) {', '.join(sorted(unknown))}")
    encoder = is_encoder(teacher)
    weights = copy.copy(cfg.weights or default_weights(encoder))
    for k in loss_keys:
        setattr(weights, k, settings.pop(k))
    cfg = DistillConfig(**{**asdict(cfg), "steps": steps, **settings, "weights": weights})
    cfg.validate()
    check_pair(teacher, student, tok, student_tok)
    ds = prepare_data(data, tok, encoder, cfg.seq_len, exclude)
    mapping = mapping or default_mapping(student, teacher)
    n_s, n_t = len(L.blocks(student)), len(L.blocks(teacher))
    if len(mapping) != n_s or not all(0 <= i < n_t for i in mapping):
        raise LeanformerError(
            f"layer mapping {mapping} must give one teacher layer (0..{n_t - 1}) per student layer ({n_s})"
        )
    use_hidden = weights.hidden > 0 and student.args.hidden_size == teacher.args.hidden_size
    if resume and checkpoint is None:
        raise LeanformerError("resume=True needs the checkpoint path of the run to continue")
    run = ck.fingerprint(
        teacher=teacher.config,
        student=student.config,
        start=ck.weights_hash(student),
        mapping=mapping,
        data=ck.data_hash(ds.train),
        weights=asdict(weights),
        **{
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("eval_every", "checkpoint_every", "device", "weights")
        },
    )
    state = ck.load_checkpoint(checkpoint, run) if resume else None  # refused here, before any training

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = native_bf16(device) if cfg.bf16 is None else cfg.bf16
    teacher.to(device).eval().requires_grad_(False)
    plain_linears_(student).to(device).train().requires_grad_(True)
    params = [p for p in student.parameters() if p.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio)
    )
    result, start = DistillResult(), 0
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"])
        start = result.resumed_from = int(state["step"])
        result.losses, result.evals = list(state["losses"]), list(state["evals"])
        result.tokens = int(state["tokens"])

    def save(step: int) -> None:
        if checkpoint is not None:
            ck.save_checkpoint(
                checkpoint,
                {
                    "run": run,
                    "step": step,
                    "student": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": ck.rng_state(),
                    "losses": result.losses,
                    "evals": result.evals,
                    "tokens": result.tokens,
                },
            )

    if start == 0:  # the starting point of every curve (a resumed run has it in its checkpoint)
        result.evals.append(
            {"step": 0, **_evaluate(evaluate, teacher, student, tok, ds, weights, cfg, device)}
        )
        student.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    step_fn = _encoder_loss if encoder else _decoder_loss
    bar = tqdm(
        range(start, cfg.steps),
        desc="distill",
        unit="step",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    )
    t0 = time.perf_counter()
    for step in bar:
        total, tokens = 0.0, 0
        for a in range(cfg.grad_accum):
            idx = batch_indices(len(ds.train), cfg.batch_size, step * cfg.grad_accum + a, cfg.seed)
            with autocast:
                loss, n_tok = step_fn(
                    teacher, student, tok, ds, idx, weights, mapping, use_hidden, cfg, device
                )
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens += n_tok
        if not math.isfinite(total):
            raise LeanformerError(f"the loss became {total} at step {step + 1}: try a smaller --lr")
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(total)
        result.tokens += tokens
        elapsed = time.perf_counter() - t0
        bar.set_postfix(
            loss=f"{total:.4f}", tok_s=f"{(result.tokens - (state or {}).get('tokens', 0)) / elapsed:.0f}"
        )
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            result.evals.append(
                {"step": done, **_evaluate(evaluate, teacher, student, tok, ds, weights, cfg, device)}
            )
            student.train()
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            save(done)
        if callback is not None:
            callback(done, total)
    result.steps, result.seconds = cfg.steps, time.perf_counter() - t0
    student.eval().requires_grad_(False)
    return result


def _decoder_loss(
    teacher, student, tok, ds: Windows, idx, w: L.LossWeights, mapping, use_hidden, cfg, device
):
    ids = ds.train[idx].to(device)  # [B, L]
    with torch.no_grad(), L.capture_hidden(teacher, use_hidden) as t_hidden:
        t_logits = teacher(ids)  # [B, L, V], once per micro-batch
    with L.capture_hidden(student, use_hidden) as s_hidden:
        s_logits = student(ids)
    loss = s_logits.new_zeros((), dtype=torch.float32)
    if w.kl:
        loss = loss + w.kl * L.kl_logits(s_logits, t_logits, w.temperature)
    if w.ce:
        loss = loss + w.ce * L.next_token_ce(s_logits, ids)
    if use_hidden:
        loss = loss + w.hidden * L.hidden_mse(s_hidden, t_hidden, mapping, None)
    return loss, ids.numel()


def encode(tok, sentences: list[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [B, T] each


def _encoder_loss(
    teacher, student, tok, ds: Sentences, idx, w: L.LossWeights, mapping, use_hidden, cfg, device
):
    ids, mask = encode(tok, [ds.train[i] for i in idx], min(cfg.seq_len, student.args.max_length), device)
    with torch.no_grad(), L.capture_hidden(teacher, use_hidden) as t_hidden:
        t_emb = teacher.pool(teacher(ids, mask), mask)  # [B, D]
    with L.capture_hidden(student, use_hidden) as s_hidden:
        s_emb = student.pool(student(ids, mask), mask)
    loss = s_emb.new_zeros((), dtype=torch.float32)
    if w.cosine:
        loss = loss + w.cosine * L.embedding_cosine(s_emb, t_emb)
    if w.contrastive and len(idx) > 1:
        loss = loss + w.contrastive * L.in_batch_contrastive(s_emb, t_emb, w.scale)
    if use_hidden:
        loss = loss + w.hidden * L.hidden_mse(s_hidden, t_hidden, mapping, mask)
    return loss, int(mask.sum())


@torch.no_grad()
def held_out_figures(teacher, student, tok, ds, w: L.LossWeights, cfg: DistillConfig, device) -> dict:
    """Decoders: the student's perplexity and KL to the teacher on the held-out windows; encoders: the
    mean cosine between student and teacher embeddings of the held-out sentences."""
    student.eval()
    if isinstance(ds, Sentences):
        ids, mask = encode(tok, ds.held_out, min(cfg.seq_len, student.args.max_length), device)
        s, t = student.pool(student(ids, mask), mask), teacher.pool(teacher(ids, mask), mask)
        return {"held_out_cosine": 1 - L.embedding_cosine(s, t).item()}
    nll = kl = 0.0
    for rows in ds.held_out.split(cfg.batch_size):
        ids = rows.to(device)
        s, t = student(ids).float(), teacher(ids).float()
        nll += L.next_token_ce(s, ids).item() * len(rows)
        kl += L.kl_logits(s, t, 1.0).item() * len(rows)
    n = len(ds.held_out)
    return {"held_out_ppl": math.exp(nll / n), "held_out_kl": kl / n}


def _evaluate(evaluate, teacher, student, tok, ds, w, cfg, device) -> dict:
    student.eval()
    out = held_out_figures(teacher, student, tok, ds, w, cfg, device)
    if evaluate is not None:
        with torch.no_grad():
            out.update(evaluate(student))
    return out
