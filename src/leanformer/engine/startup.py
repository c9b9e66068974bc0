"""What a long-running engine process does once its model is loaded."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """The model, tokenizer and libraries loaded at start live as long as the server: move them out of
    the garbage collector's reach (gc.freeze), so its full passes, which the engine thread's per-token
    allocations set off, walk the requests' objects only instead of ~225,000 (SmolLM2, transformers
    imported). Measured in the scheduler A/B: speculation's extra allocations had cost it ~2% of its
    steps in collections (0.97x vs 0.99x with the collector off)."""
    gc.collect()
    gc.freeze()
