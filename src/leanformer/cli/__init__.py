"""The `leanformer` command line: one module per command group; main.py assembles them."""

from leanformer.cli.main import main

__all__ = ["main"]
