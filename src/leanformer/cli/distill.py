"""`leanformer distill`: train a smaller student from a teacher (or heal a pruned copy of it), save it,
and show what it kept: perplexity on the held-out evaluation text (decoders) or STS-B (encoders)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from leanformer.cli import args as ck
from leanformer.errors import LeanformerError


def add_parser(sub) -> None:
    from leanformer.train.student import SPEC_HELP

    p = sub.add_parser("distill", help="train a student (fewer layers / pruned) to imitate a teacher model")
    p.add_argument("teacher", help="the teacher: a path or a known name (smollm2, minilm)")
    p.add_argument("--student", required=True, metavar="SPEC", help=SPEC_HELP)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="training text (encoders: one sentence a line, or a GLUE .tsv)",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="where the student is saved (like `leanformer compress`)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty folder that is not a leanformer save"
    )
    p.add_argument("--steps", type=ck.positive_int, default=200, metavar="N")
    p.add_argument(
        "--batch-size", type=ck.positive_int, default=8, metavar="B", help="examples per micro-batch"
    )
    p.add_argument(
        "--grad-accum", type=ck.positive_int, default=1, metavar="A", help="micro-batches per optimizer step"
    )
    p.add_argument(
        "--seq-len",
        type=ck.int_range(2),
        default=256,
        metavar="L",
        help="decoder window / encoder max tokens",
    )
    p.add_argument("--lr", type=ck.float_range(0, 1, low_open=True, high_open=True), default=1e-4)
    p.add_argument(
        "--warmup", type=ck.non_negative_int, default=None, metavar="N", help="warm-up steps (default 5%%)"
    )
    p.add_argument("--clip", type=ck.float_range(0), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--temperature", type=ck.float_range(0, low_open=True), default=2.0)
    for name, help in (("kl", "KL on logits"), ("ce", "next-token loss"), ("hidden", "hidden-state MSE"),
                       ("cosine", "embedding cosine"), ("contrastive", "in-batch contrastive")):  # fmt: skip
        p.add_argument(
            f"--{name}", type=ck.float_range(0), default=None, metavar="W", help=f"weight of the {help} loss"
        )
    p.add_argument("--seed", type=ck.non_negative_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="checkpoint file (default: OUTPUT.ckpt next to the output)",
    )
    p.add_argument("--checkpoint-every", type=ck.non_negative_int, default=50, metavar="N")
    p.add_argument(
        "--eval-every",
        type=ck.non_negative_int,
        default=0,
        metavar="K",
        help="evaluate every K steps (0: at the end)",
    )
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="decoders: text for the perplexity protocol (its first --eval-chars are never trained on); encoders: STS-B .tsv")  # fmt: skip
    p.add_argument("--eval-chars", type=ck.positive_int, default=60000, metavar="N")
    p.add_argument("--window", type=ck.int_range(2), default=512, metavar="W", help="perplexity window")
    p.add_argument(
        "--calibration-samples",
        type=ck.positive_int,
        default=16,
        metavar="N",
        help="windows for a calibrated preset",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="plot the evaluation curve (ΔPPL or STS-B vs steps)"
    )
    p.add_argument("--no-speed", action="store_true", help="encoders: skip the embeddings/s comparison")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present")
    p.set_defaults(func=cmd_distill)


def _check_files(args) -> None:
    """Everything checkable before minutes of loading: files, output folder, resume."""
    from leanformer.outputs import check_output_dir, check_output_file

    for flag, name in (("--data", args.data), ("--eval-data", args.eval_data)):
        if name and not Path(name).expanduser().is_file():
            raise LeanformerError(f"{flag} file not found: {name}")
    if Path(args.data).expanduser().stat().st_size == 0:
        raise LeanformerError(f"--data file {args.data} is empty: give a plain text file with training text")
    check_output_dir(args.output, args.overwrite)
    if args.plot:
        check_output_file(args.plot)
    if args.resume and not Path(checkpoint_path(args)).is_file():
        raise LeanformerError(
            f"--resume: no checkpoint at {checkpoint_path(args)}; run once without --resume first"
        )


def checkpoint_path(args) -> str:
    return args.checkpoint or str(Path(args.output).expanduser()).rstrip("/") + ".ckpt"


def cmd_distill(args) -> None:
    import leanformer as lf
    from leanformer.hub import resolve_model
    from leanformer.train.distill import DistillConfig, default_weights, distill, prepare_data
    from leanformer.train.student import is_encoder, make_student

    _check_files(args)
    path = resolve_model(args.teacher)
    # float weights for training, whatever load's GGUF default; plain Linears (autograd through them)
    teacher, tok = lf.load(path, keep_quantized=False, fast=False)
    encoder = is_encoder(teacher)
    weights = default_weights(encoder)
    for name in ("kl", "ce", "hidden", "cosine", "contrastive"):
        if getattr(args, name) is not None:
            setattr(weights, name, getattr(args, name))
    weights.temperature = args.temperature
    eval_text = None if encoder or not args.eval_data else _eval_text(args)
    data = prepare_data(args.data, tok, encoder, args.seq_len, exclude=eval_text)
    student_tok, mapping = None, None
    if Path(args.student).expanduser().is_dir():
        student, student_tok = lf.load(args.student, keep_quantized=False, fast=False)
    else:
        calibration = None if encoder else data.train[: args.calibration_samples]
        student, mapping = make_student(teacher, args.student, calibration)
    cfg = DistillConfig(
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, grad_accum=args.grad_accum,
        clip=args.clip, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed,
        device=args.device, weights=weights,
    )  # fmt: skip
    evaluate, baseline = _evaluator(args, teacher, tok, encoder, eval_text)
    if args.plot and evaluate is None:  # before training, not after it (the model would be saved, then this)
        raise LeanformerError("--plot needs evaluations: pass --eval-data (and --eval-every K)")
    result = distill(
        teacher, student, tok, data, args.steps, config=cfg, mapping=mapping, checkpoint=checkpoint_path(args),
        resume=args.resume, evaluate=evaluate, student_tok=student_tok,
    )  # fmt: skip
    student.cpu()
    out = lf.save(student, student_tok or tok, args.output, overwrite=args.overwrite)
    evals = result.evals  # step 0 (before training), every --eval-every steps, the last step
    history = {"teacher": baseline, "evals": evals, "losses": result.losses, "tokens": result.tokens,
               "seconds": result.seconds, "resumed_from": result.resumed_from}  # fmt: skip
    from leanformer.outputs import write_file_atomic

    write_file_atomic(out / "distill.json", json.dumps(history, indent=2))
    if args.plot:
        plot_curve(args.plot, evals, baseline, encoder)
    rows = [
        ("saved to", str(out)),
        ("steps", f"{result.steps} ({result.tokens} tokens, {result.seconds:.0f} s)"),
    ]
    last = evals[-1] if evals else {}
    if encoder and "stsb_spearman" in last:
        rows.append(
            ("STS-B teacher / student", f"{baseline['stsb_spearman']:.4f} / {last['stsb_spearman']:.4f}")
        )
        if not args.no_speed:
            t_rate, s_rate = embeddings_per_second(path, out, args.eval_data)
            rows.append(
                ("embeddings/s teacher / student", f"{t_rate:.0f} / {s_rate:.0f} ({s_rate / t_rate:.2f}x)")
            )
    elif "ppl" in last:
        first = evals[0]["ppl"]
        rows.append(
            (
                "perplexity teacher / student before / after",
                f"{baseline['ppl']:.3f} / {first:.3f} / {last['ppl']:.3f}",
            )
        )
        gap = first - baseline["ppl"]
        if gap > 0:
            rows.append(("ΔPPL recovered", f"{100 * (first - last['ppl']) / gap:.1f}%"))
    for k, v in last.items():
        if k.startswith("held_out"):
            rows.append((k.replace("_", " "), f"{v:.4f}"))
    from leanformer.cli.common import print_table

    print_table("distill", ["", ""], rows)


def _eval_text(args) -> str:
    from leanformer.measure.evaluate import read_text

    return read_text(args.eval_data, args.eval_chars)


def _evaluator(args, teacher, tok, encoder: bool, eval_text: str | None):
    """(student → figures, the teacher's figures) on the evaluation text / STS-B, or (None, {})."""
    if encoder:
        from leanformer.encoders.quality import _shared_data, eval_stsb

        if not args.eval_data and _shared_data() is None:
            return None, {}

        def ev(model) -> dict:
            return {"stsb_spearman": eval_stsb(model, tok, args.eval_data)["stsb_spearman"]}

        return ev, ev(teacher)
    if eval_text is None:
        return None, {}
    from leanformer.measure.evaluate import evaluate, tokenize

    ids = tokenize(tok, eval_text)

    def ev(model) -> dict:
        return {"ppl": evaluate(model, ids, args.window, progress=False).perplexity}

    return ev, ev(teacher)


def embeddings_per_second(teacher_path, student_path, stsb=None, repeats: int = 3) -> tuple[float, float]:
    """STS-B sentences embedded per second by the teacher and the saved student, each loaded as users
    load them; rounds interleaved, median of `repeats` (a shared machine's load drifts)."""
    import statistics

    import leanformer as lf
    from leanformer.encoders.quality import glue_path, read_tsv

    rows = read_tsv(stsb or glue_path("stsb"))
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    models = [lf.load(teacher_path), lf.load(student_path)]
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for k, (m, t) in enumerate(models):
            t0 = time.perf_counter()
            lf.embed(m, t, texts, 32)
            times[k].append(time.perf_counter() - t0)
    return tuple(len(texts) / statistics.median(t) for t in times)  # type: ignore[return-value]


def plot_curve(path: str, evals: list[dict], baseline: dict, encoder: bool) -> None:
    """ΔPPL (student - teacher) or STS-B, and the held-out KL / cosine to the teacher, vs training steps;
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanformer.outputs import write_file_atomic

    key = "stsb_spearman" if encoder else "ppl"
    held = "held_out_cosine" if encoder else "held_out_kl"
    points = [(e["step"], e[key]) for e in evals if key in e]
    if not points:
        raise LeanformerError("--plot needs evaluations: pass --eval-data (and --eval-every K)")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot([s for s, _ in points], [v if encoder else v - baseline[key] for _, v in points], marker="o")
    ax.set_xlabel("training steps")
    ax.set_ylabel("STS-B Spearman" if encoder else "ΔPPL vs teacher (evaluation text)")
    if encoder:
        ax.axhline(baseline[key], ls="--", c="gray", label="teacher")
        ax.legend()
    else:
        ax.axhline(0, ls="--", c="gray")
    held_points = [(e["step"], e[held]) for e in evals if held in e]
    ax2.plot([s for s, _ in held_points], [v for _, v in held_points], marker="o", c="tab:orange")
    ax2.set_xlabel("training steps")
    ax2.set_ylabel(
        "cosine to the teacher (held-out)" if encoder else "KL(teacher ‖ student), held-out windows"
    )
    fig.suptitle("distillation: " + ("STS-B" if encoder else "ΔPPL and KL to the teacher"))
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
