"""`python -m leanformer ...` (and `torchrun ... -m leanformer generate MODEL --tp N`): the command line."""

import sys

from leanformer.cli.main import main

sys.exit(main())
