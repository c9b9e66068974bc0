"""The server's KV-cache flags against bad input: each is checked when parsed (or, for flags that only
make sense together, before the model loads), and every failure is one `error:` line, exit 2."""

from __future__ import annotations

import pytest

from leanformer.cli.main import build_parser, main
from tests.hostile.test_cli import M, fake_model, no_loading, one_error_line  # noqa: F401 (fixtures)

BAD = [
    ["--block-size", "0", "--block-size must be at least 1"],
    ["--block-size", "4096", "--block-size must be below 1025"],
    ["--block-size", "1.5", "expects an integer"],
    ["--kv-blocks", "0", "--kv-blocks must be at least 1"],
    ["--kv-blocks", "-7", "--kv-blocks must be at least 1"],
    ["--kv-blocks", "nan", "expects an integer"],
    ["--kv-cache", "pages", "invalid choice"],
    ["--kv-cache", "slots", "--kv-blocks", "64", "apply to --kv-cache paged only"],
    ["--kv-cache", "slots", "--no-prefix-cache", "apply to --kv-cache paged only"],
    [
        "--kv-blocks",
        "10",
        "--block-size",
        "16",
        "--max-seq",
        "2048",
        "cannot hold one request of --max-seq 2048",
    ],
    ["--window", "0", "--window must be at least 1"],
    ["--window", "8.5", "expects an integer"],
    ["--sinks", "-1", "--sinks must be at least 0"],
    ["--sinks", "4", "--sinks goes with --window"],
    ["--speculative", "ngram", "invalid choice"],
    ["--window", "64", "--speculative", "prompt-lookup", "does not combine with --window"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a[:-1]))
def test_kv_flags_are_one_line_errors(argv, fake_model, no_loading, capsys):  # noqa: F811
    *flags, fragment = argv
    assert main(["serve", str(fake_model), *flags]) == 2
    one_error_line(capsys, fragment)


def test_kv_flag_edges_are_accepted():
    p = build_parser()
    args = p.parse_args(["serve", M, "--block-size", "1", "--kv-blocks", "1", "--no-prefix-cache"])
    assert (args.block_size, args.kv_blocks, args.no_prefix_cache, args.kv_cache) == (1, 1, True, "paged")
    assert p.parse_args(["serve", M, "--kv-cache", "slots", "--block-size", "1024"]).kv_cache == "slots"
    args = p.parse_args(["serve", M, "--window", "1", "--sinks", "0", "--speculative", "off"])
    assert (args.window, args.sinks, args.speculative) == (1, 0, "off")
