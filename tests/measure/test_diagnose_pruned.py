"""Per-layer diagnosis of pruned and factorised models (measure/diagnose.py): zeros written into a
Linear (Magnitude / Wanda), LowRankLinear factors and structured FFN pruning (the MLP block as the
unit) are ranked like quantized layers; a model with removed layers fails in one line."""

from __future__ import annotations

import pytest
import torch

from leanformer.compress import LowRank, Magnitude, PruneFFN, PruneLayers, prune_, quantize_
from leanformer.compress.config import matches
from leanformer.errors import LeanformerError
from leanformer.loading import load
from leanformer.measure.diagnose import ignore_pattern, per_layer_errors

pytestmark = pytest.mark.usefixtures("one_thread")
BAD = "model.layers.0.mlp.gate_up_proj"


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_unstructured_zeros_are_ranked_worst_first(tiny_dirs):
    reference, _ = load(tiny_dirs["llama"])
    model, _ = load(tiny_dirs["llama"])
    prune_(model, Magnitude(sparsity=0.8, targets=[BAD]), progress=False)
    prune_(model, Magnitude(sparsity=0.1, ignore=["lm_head", BAD]), progress=False)
    rows = per_layer_errors(model, reference, _windows(), top=3, progress=False)
    assert len(rows) == 2 * 4  # every pruned Linear, though all stay (Fast)Linear modules
    assert rows[0].name == BAD and "80% zeros" in rows[0].kind
    assert rows[0].kld_alone > rows[1].kld_alone > 0
    assert (
        torch.count_nonzero(reference.get_submodule(BAD).weight)
        == reference.get_submodule(BAD).weight.numel()
    )


def test_lowrank_and_structured_ffn_units(tiny_dirs):
    reference, _ = load(tiny_dirs["llama"])
    calib = _windows(1)
    model, _ = load(tiny_dirs["llama"])
    quantize_(
        model, LowRank(ratio=0.5, multiple=8, keep="smaller", targets=["*o_proj"]), calib, progress=False
    )
    prune_(model, PruneFFN(sparsity=0.5, multiple=16), calib, progress=False)
    rows = per_layer_errors(model, reference, _windows(), top=4, progress=False)
    kinds = {r.name: r.kind for r in rows}
    assert kinds["model.layers.0.self_attn.o_proj"] == "LowRankLinear"
    assert kinds["model.layers.1.mlp"].endswith("% params)")  # the MLP block, not its resized Linears
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in kinds)
    assert len(rows) == 4 and all(r.kld_alone > 0 and r.local_rel_error > 0 for r in rows)
    # the ignore suggestion for a block reaches the Linears PruneFFN selects
    block = next(r for r in rows if r.name == "model.layers.1.mlp")
    assert matches("model.layers.1.mlp.down_proj", [ignore_pattern(block)])
    assert ignore_pattern(next(r for r in rows if r.kind == "LowRankLinear")).endswith("o_proj")


def test_removed_layers_fail_in_one_line(tiny_dirs):
    reference, _ = load(tiny_dirs["llama"])
    model, _ = load(tiny_dirs["llama"])
    prune_(model, PruneLayers(n_layers=1), _windows(1), progress=False)
    with pytest.raises(LeanformerError, match="decoder layers"):
        per_layer_errors(model, reference, _windows(), progress=False)
