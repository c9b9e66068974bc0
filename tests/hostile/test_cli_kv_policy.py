"""KV-policy flags (generate / chat / eval --long) against bad input: one `error:` line, before loading."""

from __future__ import annotations

import pytest

from leanformer.cli.main import main
from tests.hostile.test_cli import fake_model, no_loading, one_error_line  # noqa: F401 (fixtures)

CASES = [
    (["generate", "M", "--window", "0"], "--window must be at least 1"),
    (["generate", "M", "--window", "x"], "expects an integer"),
    (["generate", "M", "--window", "64", "--sinks", "-1"], "--sinks must be at least 0"),
    (["chat", "M", "--kv-budget", "0"], "--kv-budget must be above 0"),
    (["generate", "M", "--kv-budget", "nan"], "finite"),
    (["generate", "M", "--kv-budget", "1.5"], "whole number of tokens"),
    (["generate", "M", "--kv-budget", "0.25", "--evict", "lru"], "invalid choice"),
    (["generate", "M", "--window", "64", "--kv-budget", "0.25"], "give one of them"),
    (["generate", "M", "--evict", "h2o"], "--evict h2o needs --kv-budget"),
    (["generate", "M", "--sinks", "4"], "--sinks goes with --window"),
    (["generate", "M", "--window", "64", "--speculative", "prompt-lookup"], "does not combine"),
    (["eval", "M", "--sinks", "4"], "--sinks goes with --long"),
    (["eval", "M", "--kv-budget", "0.25"], "--kv-budget goes with --long"),
    (["eval", "M", "--long", "--chunk", "0"], "--chunk must be at least 1"),
    (["eval", "M", "--long", "--tokens", "1"], "--tokens must be at least 2"),
    (["eval", "M", "--long", "--prompt-len", "3"], "--prompt-len must be at least 16"),
    (["eval", "M", "--long", "--needles", "-2"], "--needles must be at least 0"),
    (["eval", "M", "--long", "--evict", "snapkv"], "needs --kv-budget"),
    (["eval", "M", "--long", "--reference", "M"], "does not combine"),
]


@pytest.mark.parametrize(("argv", "fragment"), CASES)
def test_bad_kv_policy_flags_are_one_line(argv, fragment, fake_model, no_loading, capsys):  # noqa: F811
    argv = [str(fake_model) if a == "M" else a for a in argv]
    assert main(argv) == 2
    one_error_line(capsys, fragment)
