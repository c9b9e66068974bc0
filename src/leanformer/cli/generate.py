"""`leanformer generate` and `leanformer chat`: streamed text from a prompt or a conversation."""

from __future__ import annotations

import argparse
import sys

from leanformer.cli import args as ck
from leanformer.cli.common import (
    add_sampling,
    load_model,
    model_command,
    sampling_kwargs,
)
from leanformer.errors import LeanformerError


def speculative_method(args):
    """--speculative prompt-lookup | draft:PATH → the speculative= argument (a bad value fails first)."""
    from leanformer.measure.bench.speculative import load_draft, parse_method

    return None if args.speculative is None else parse_method(args.speculative, load_draft)[1]


def kv_budget(text: str) -> int | float:
    """--kv-budget: a share of the prompt in (0, 1) or a whole number of tokens ≥ 1."""
    value = ck.float_range(0, low_open=True)(text)
    if value < 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1) or a whole number of tokens, got {text}")
    return int(value)


def add_kv_policy(p, window: bool = True) -> None:
    """--sinks / --window (sliding window) and --kv-budget / --evict (eviction); eval has its own --window."""
    g = p.add_argument_group("KV policy (long sequences; models/kv_policy.py)")
    if window:
        g.add_argument(
            "--window", type=ck.positive_int, default=None,
            help="sliding window: keep the --sinks first tokens and the newest N; generation runs past the context",
        )  # fmt: skip
    g.add_argument("--sinks", type=ck.non_negative_int, default=None, help="attention sinks kept (default 4)")
    g.add_argument(
        "--kv-budget", type=kv_budget, default=None,
        help="evict the KV cache down to N tokens, or to this share of the prompt (e.g. 0.25)",
    )  # fmt: skip
    g.add_argument(
        "--evict", choices=("h2o", "snapkv"), default=None,
        help="with --kv-budget: h2o (heavy hitters, default) or snapkv (prompt compression)",
    )  # fmt: skip


def kv_policy(args):
    """The flags → a policy (or None); conflicting flags fail in one line before the model loads."""
    from leanformer.models.kv_policy import HeavyHitters, SinkWindow, SnapKV

    window, budget = getattr(args, "window", None), args.kv_budget
    sinks = 4 if args.sinks is None else args.sinks
    if window is not None and budget is not None:
        raise LeanformerError("--window and --kv-budget are two policies: give one of them")
    if args.evict and budget is None:
        raise LeanformerError(f"--evict {args.evict} needs --kv-budget (e.g. --kv-budget 0.25)")
    if window is not None:
        return SinkWindow(sinks, window)
    if budget is not None:
        return SnapKV(budget, sinks) if args.evict == "snapkv" else HeavyHitters(budget, sinks)
    if args.sinks is not None:
        raise LeanformerError("--sinks goes with --window N or --kv-budget B")
    return None


def cmd_generate(args) -> None:
    import leanformer as lf

    spec = speculative_method(args)
    policy = kv_policy(args)
    if policy is not None and spec is not None:
        raise LeanformerError("--speculative does not combine with --window / --kv-budget: give one")
    model, tok = load_model(args)
    prompt = args.prompt
    if args.chat:
        prompt = [{"role": "user", "content": args.prompt}]
    elif tok is None:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise LeanformerError(
                "this model has no tokenizer: --prompt must be space-separated token ids, e.g. '1 2 3'"
            ) from None
    pieces = lf.stream_generate(
        model,
        tok,
        prompt,
        args.max_new_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        speculative=spec,
        kv_policy=policy,
        **sampling_kwargs(args),
    )
    if not args.chat and tok is not None:
        print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece if isinstance(piece, str) else f" {piece}", end="", flush=True)
    print()


def cmd_chat(args) -> None:
    import leanformer as lf

    spec = speculative_method(args)
    policy = kv_policy(args)
    if policy is not None and spec is not None:
        raise LeanformerError("--speculative does not combine with --window / --kv-budget: give one")
    model, tok = load_model(args)
    if tok is None or not getattr(tok, "chat_template", None):
        raise LeanformerError("this model has no chat template; use `leanformer generate` instead")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": line})
        reply = []
        for piece in lf.stream_generate(
            model,
            tok,
            history,
            args.max_new_tokens,
            speculative=spec,
            kv_policy=policy,
            **sampling_kwargs(args),
        ):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


SPECULATIVE_HELP = (
    "speculative decoding, same output as plain greedy decoding: prompt-lookup (copies spans of the "
    "prompt; no second model), layer-skip:N (the model's first N layers draft) or draft:PATH (a smaller "
    "model with the same vocabulary; a GGUF stays int)"
)


def add_parser(sub) -> None:
    p = model_command(sub, "generate", "generate text from a prompt (streams)")
    p.add_argument(
        "--prompt", default="", help="text (or space-separated token ids for a model without tokenizer)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling(p)
    p.add_argument(
        "--speculative", default=None, metavar="prompt-lookup|layer-skip:N|draft:PATH", help=SPECULATIVE_HELP
    )
    add_kv_policy(p)
    p.set_defaults(func=cmd_generate)

    p = model_command(sub, "chat", "interactive chat using the model's chat template")
    p.add_argument("--system", default=None)
    add_sampling(p)
    p.add_argument(
        "--speculative", default=None, metavar="prompt-lookup|layer-skip:N|draft:PATH", help=SPECULATIVE_HELP
    )
    add_kv_policy(p)
    p.set_defaults(func=cmd_chat)
