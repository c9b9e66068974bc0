"""Argument checks for the `leanformer` CLI: every numeric flag is validated when parsed, and every
parse error is one line on stderr (`error: --window must be at least 2`), exit status 2.

The type functions raise argparse.ArgumentTypeError; OneLineParser.error prints argparse's message
without the usage block, turning "argument --window: must be ..." into "--window must be ...".
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from typing import NoReturn

from leanformer.engine.sampling import SEED_LIMIT


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors; subparsers inherit the class (add_subparsers uses type(self))."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        self.exit(2, f"error: {message}\n")


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in low..high-1 (no upper bound when high is None)."""

    def parse(text: str) -> int:
        value = int(_number(int, text))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"must be below {high}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, SEED_LIMIT)


def float_range(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float in [low, high], with either end open when asked; NaN and inf are always refused."""

    def parse(text: str) -> float:
        value = float(_number(float, text))
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low and high is None:
            raise argparse.ArgumentTypeError(
                f"must be {'above' if low_open else 'at least'} {low:g}, got {text}"
            )
        if too_low or too_high:
            lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
            hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {lo}, {hi}, got {text}")
        return value

    parse.__name__ = "bounded_float"
    return parse


non_negative_float = float_range(0.0)  # --temperature: 0 = greedy
positive_float = float_range(0.0, low_open=True)  # --repetition-penalty
probability = float_range(0.0, 1.0, low_open=True)  # --top-p in (0, 1]
fraction = float_range(0.0, 1.0, low_open=True, high_open=True)  # prune-heads --fraction in (0, 1)


def heads_json(text: str) -> dict[int, list[int]]:
    """prune-heads --heads: a JSON object {"layer": [head, ...]} with non-negative integers."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e.msg})") from None
    shape = 'a JSON object {"layer": [heads]} of non-negative integers'
    if not isinstance(raw, dict):
        raise argparse.ArgumentTypeError(f"must be {shape}")
    out: dict[int, list[int]] = {}
    for layer, heads in raw.items():
        if not (str(layer).isdigit() and isinstance(heads, list)):
            raise argparse.ArgumentTypeError(f"must be {shape}")
        if not all(type(h) is int and h >= 0 for h in heads):
            raise argparse.ArgumentTypeError(f"must be {shape}")
        out[int(layer)] = heads
    return out
