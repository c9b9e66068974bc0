"""`python -m leanformer.cli ...` (and `torchrun -m leanformer.cli ...`): the `leanformer` command."""

import sys

from leanformer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
