"""engine/startup.py: the objects alive at start leave the collector's generations."""

from __future__ import annotations

import gc

from leanformer.engine.startup import freeze_startup_objects


def test_freeze_moves_live_objects_out_of_collections():
    keep = [[i] for i in range(1000)]  # tracked containers alive now
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(keep)
        assert not any(gc.is_tracked(x) and x in gc.get_objects() for x in keep[:3])  # not in a generation
    finally:
        gc.unfreeze()
