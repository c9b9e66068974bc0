"""A head-pruned decoder (compress/prune_heads.py: per-layer query-head counts, whole KV groups gone)
exports to ONNX with parity, and ONNX greedy decoding of a batch equals ours (fused C++ step)."""

from __future__ import annotations

import pytest
import torch

from tests.export.test_export import assert_reloads_and_exports

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_pruned_decoder_exports_with_parity(tiny_dirs, tmp_path):  # ~20 s at load 3 (torch.onnx)
    pytest.importorskip("onnxruntime")
    import leanformer as lf
    from leanformer.compress.config import PruneHeads
    from leanformer.compress.recipe import prune_

    model, _ = lf.load(tiny_dirs["qwen2"])
    ids = torch.randint(0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_(model, PruneHeads(kv_sparsity=0.5), ids, progress=False)  # whole KV groups: every layer
    prune_(model, PruneHeads(sparsity=0.5, targets=["model.layers.1.*"]), ids, progress=False)  # then one
    assert [m.self_attn.n_heads for m in model.model.layers] == [2, 1]
    assert_reloads_and_exports(model, tmp_path)
