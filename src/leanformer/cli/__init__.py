"""The `leanformer` command line: one module per command group; main.py assembles them (entry point
`leanformer.cli.main:main`)."""
