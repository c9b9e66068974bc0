"""Pruning (compress/prune.py, structured.py): bad configs fail in one line before any work; masks
have the promised pattern; on the real stories260K Wanda beats magnitude at 50% and SparseGPT beats
Wanda at 2:4; pruned models save and reload; quantizing after pruning keeps int8 zeros at zero;
PruneFFN physically shrinks the MLPs and the per-layer widths rebuild on load."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.compress import (
    Int4WeightOnly,
    Int8Linear,
    Int8WeightOnly,
    Magnitude,
    PruneFFN,
    PruneLayers,
    QuantConfig,
    SparseGPT,
    Wanda,
    apply,
    load_recipe,
    prune_,
)
from leanformer.compress.prune import prune_mask, sparsegpt_prune_weight
from leanformer.errors import LeanformerError
from leanformer.kernels.modules import plain_linears
from leanformer.measure.evaluate import evaluate, read_text, tokenize


@pytest.fixture(scope="module")
def stories(shared):
    """(path, calibration [8, 128], held-out ids, fp32 model): TinyStories sample split in two."""
    path = shared / "models/stories260K"
    base, tok = lf.load(path, fast=False)
    ids = tokenize(tok, read_text(shared / "data/tinystories/sample.txt"))
    return path, torch.tensor(ids[:1024]).view(8, 128), ids[1024:], base


def _pruned(path, cfg, calib):
    """Loaded as users load (fast Linears: oneDNN-packed copies for prefill, GEMV for decode)."""
    model, tok = lf.load(path)
    prune_(model, cfg, calib, progress=False)
    return model, tok


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": {"mlp.*": 1.5}}, r"sparsity must be a number in \[0, 1\)"),
        ({"pattern": "diagonal"}, "pattern must be 'unstructured' or 'N:M'"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.3}, "pattern 2:4 means sparsity 0.5"),
    ],
)
def test_bad_configs_fail_in_one_line_before_any_work(tiny_lm, kwargs, match):
    before = {n: p.clone() for n, p in tiny_lm.state_dict().items()}
    for cls in (Magnitude, Wanda, SparseGPT):
        with pytest.raises(LeanformerError, match=match) as e:
            prune_(tiny_lm, cls(**kwargs), calibration=None)  # fails before asking for calibration
        assert "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.state_dict().items())
    with pytest.raises(LeanformerError, match=match):  # the same checks from a saved recipe
        apply(tiny_lm, QuantConfig.from_dict({"type": "Wanda", **kwargs}))
    with pytest.raises(LeanformerError, match=r"in \[0, 1\)"):
        PruneFFN(sparsity=1.0).validate()


def test_calibrated_configs_need_calibration_and_nm_needs_divisible_width(tiny_lm):
    with pytest.raises(LeanformerError, match="Wanda needs calibration"):
        prune_(tiny_lm, Wanda(), calibration=None)
    with pytest.raises(LeanformerError, match="divisible by 48"):  # in_features 64 and 128
        prune_(tiny_lm, Magnitude(pattern="24:48", sparsity=0.5))
    with pytest.raises(LeanformerError, match="prune_ expects"):
        prune_(tiny_lm, Int8WeightOnly())


def test_masks_have_the_promised_pattern():
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    nm = prune_mask(score, 0.5, (2, 4)).view(16, 16, 4)
    assert (nm.sum(-1) == 2).all()  # exactly 2 of every 4 pruned ...
    kept_min = score.view(16, 16, 4).masked_fill(nm, float("inf")).min(-1).values
    pruned_max = score.view(16, 16, 4).masked_fill(~nm, -1).max(-1).values
    assert (pruned_max <= kept_min).all()  # ... the lowest-scored ones
    rows = prune_mask(score, 0.3, None)
    assert (rows.sum(1) == int(64 * 0.3)).all()


def test_sparsegpt_update_beats_masking_on_the_layer_output():
    """Same 2:4 sparsity: SparseGPT's error feedback gives a smaller ||X (W - W')|| than pruning by
    |W| * ||X_j|| (Wanda) without updating the rest."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.3 * torch.randn(
        512, 64, generator=gen
    )
    w = torch.randn(32, 64, generator=gen)
    h = 2 * x.T @ x / len(x)
    sgpt = sparsegpt_prune_weight(w, h, 0.5, (2, 4), block_size=16)
    assert ((sgpt.view(32, 16, 4) == 0).sum(-1) >= 2).all()
    wanda = w.masked_fill(prune_mask(w.abs() * x.norm(dim=0), 0.5, (2, 4)), 0)
    err = {k: float((x @ (w - v).T).norm()) for k, v in (("sparsegpt", sgpt), ("wanda", wanda))}
    assert err["sparsegpt"] < 0.8 * err["wanda"], err


def test_quality_order_on_stories260k(stories):
    """The issue's bar on real weights: Wanda ΔPPL < magnitude ΔPPL at 50% unstructured, SparseGPT ≤
    Wanda at 2:4. Measured (fp32 5.343): magnitude 46.7, Wanda 29.3, SparseGPT 21.3 at 50%; at 2:4
    magnitude 158.5, Wanda 78.0, SparseGPT 54.6 (a 260K-parameter model has no redundancy to spare)."""
    path, calib, heldout, base = stories
    ppl = {}
    for name, cfg in [
        ("magnitude", Magnitude()),
        ("wanda", Wanda()),
        ("sparsegpt", SparseGPT()),
        ("wanda-2:4", Wanda(pattern="2:4")),
        ("sparsegpt-2:4", SparseGPT(pattern="2:4")),
    ]:
        model, _ = _pruned(path, cfg, calib)
        weights = [m.weight for n, m in model.named_modules() if n.endswith(("qkv_proj", "down_proj"))]
        assert all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01) for w in weights)
        ppl[name] = evaluate(model, heldout, 256, progress=False).perplexity
    assert ppl["wanda"] < 0.8 * ppl["magnitude"], ppl
    assert ppl["sparsegpt"] <= ppl["wanda"], ppl
    assert ppl["sparsegpt-2:4"] <= 0.9 * ppl["wanda-2:4"], ppl
    assert ppl["sparsegpt"] == pytest.approx(21.27, rel=0.05)  # the method itself has not moved


def test_save_reload_and_quantize_after_pruning(stories, tmp_path):
    """Zeros survive save → load; int8 (symmetric) after pruning keeps every zero at code 0; int4
    (asymmetric, zero-point per group) does not: a zero lands on the nearest grid value."""
    path, calib, heldout, _ = stories
    model, tok = _pruned(path, Wanda(sparsity={"mlp.*": 0.5, "self_attn.*": 0.25}), calib)
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == 0.5
    assert float((model.model.layers[0].self_attn.o_proj.weight == 0).float().mean()) == 0.25
    lf.save(model, tok, tmp_path / "w")
    again, _ = lf.load(tmp_path / "w")
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.tensor([heldout[:64]])  # prefill: the fast Linears' packed copies hold the zeros too
    assert torch.equal(model(ids), again(ids))
    with torch.no_grad(), plain_linears(model):
        assert torch.allclose(model(ids), again(ids), atol=1e-4)
    assert again.config["leanformer"]["recipe"]["stages"][0]["type"] == "Wanda"

    zeros = model.model.layers[0].mlp.down_proj.weight == 0
    apply(model, load_recipe("int8"))
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, Int8Linear) and (q.dequantize()[zeros] == 0).all()
    lf.save(model, tok, tmp_path / "w8")
    q8, _ = lf.load(tmp_path / "w8", fast=False)
    assert (q8.model.layers[0].mlp.down_proj.dequantize()[zeros] == 0).all()

    model, _ = _pruned(path, Magnitude(), calib)
    zeros = model.model.layers[0].self_attn.qkv_proj.weight == 0
    apply(model, Int4WeightOnly(group_size=32, targets=["self_attn.*"]))
    exact = float((model.model.layers[0].self_attn.qkv_proj.dequantize()[zeros] == 0).float().mean())
    assert exact < 0.5  # most zeros become small nonzero values under a zero-point grid


def test_prune_ffn_shrinks_and_reloads(stories, tmp_path):
    """PruneFFN removes channels (widths a multiple of `multiple`), the config records them, save →
    load rebuilds the smaller model exactly, the fused decode step matches the module path, and the
    least-squares refit of down_proj costs less perplexity than dropping channels alone."""
    path, calib, heldout, base = stories
    ppl = {}
    for refit in (False, True):
        model, tok = _pruned(path, PruneFFN(sparsity=0.25, multiple=32, refit=refit), calib)
        ppl[refit] = evaluate(model, heldout, 256, progress=False).perplexity
    assert [layer.mlp.inter for layer in model.model.layers] == [128] * 5  # 172 → 128
    assert model.config["intermediate_sizes"] == [128] * 5
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())
    assert ppl[True] < ppl[False], ppl
    lf.save(model, tok, tmp_path / "ffn")
    again, _ = lf.load(tmp_path / "ffn")
    ids = torch.tensor([heldout[:64]])
    assert torch.equal(model(ids), again(ids))
    fused = lf.generate(again, tok, "Once", max_new_tokens=16)
    again.fused_decode = False
    assert lf.generate(again, tok, "Once", max_new_tokens=16) == fused
    apply(again, Int8WeightOnly())  # a later quantization stage sees the smaller Linears
    assert again.model.layers[0].mlp.down_proj.in_features == 128


def test_prune_layers_removes_the_least_influential_and_reloads(stories, tmp_path):
    """PruneLayers removes the layer whose output turns the residual stream least (stories260K: block
    influence 0.23, 0.15, 0.126, 0.129, 0.15 -> layer 2), renumbers the rest, and save -> load
    rebuilds 4 layers (with PruneFFN's widths) that compute exactly the same logits."""
    from leanformer.compress.structured import block_influence

    path, calib, heldout, base = stories
    bi = block_influence(base, calib, 8)
    model, tok = _pruned(path, PruneFFN(sparsity=0.25), calib)
    prune_(model, PruneLayers(n_layers=1), calib, progress=False)
    assert len(model.model.layers) == 4 and model.config["num_hidden_layers"] == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert int(bi.argmin()) == 2
    stages = [s["type"] for s in model.config["leanformer"]["recipe"]["stages"]]
    assert stages == ["PruneFFN", "PruneLayers"]
    lf.save(model, tok, tmp_path / "d")
    again, _ = lf.load(tmp_path / "d")
    ids = torch.tensor([heldout[:64]])
    assert torch.equal(model(ids), again(ids))
    assert lf.generate(again, tok, "", max_new_tokens=8).startswith("Once upon a time")
    with pytest.raises(LeanformerError, match="must be below the model's 4 layers"):
        prune_(again, PruneLayers(n_layers=4), calibration=None)  # before asking for calibration
    with pytest.raises(LeanformerError, match="n_layers must be a positive integer"):
        prune_(again, PruneLayers(n_layers=0))


def test_bad_intermediate_sizes_is_one_line(stories, tmp_path):
    path, calib, _, _ = stories
    model, tok = _pruned(path, PruneFFN(sparsity=0.25, multiple=32), calib)
    model.config["intermediate_sizes"] = [128, 128]
    lf.save(model, tok, tmp_path / "bad")
    with pytest.raises(LeanformerError, match="intermediate_sizes must list one positive width per layer"):
        lf.load(tmp_path / "bad")


def test_presets_and_cli_compress_wanda(shared, tmp_path, capsys):
    from leanformer.cli.main import main

    assert [type(c).__name__ for c in load_recipe("wanda-50+int8").stages] == ["Wanda", "Int8WeightOnly"]
    assert load_recipe("sparsegpt-2:4").stages[0].pattern == "2:4"
    model = str(shared / "models/stories260K")
    text = str(shared / "data/tinystories/sample.txt")
    base = ["compress", model, "--recipe", "wanda-50", "-o", str(tmp_path / "w"), "--no-speed"]
    assert main(base) == 2  # Wanda needs --calibration: refused before loading
    assert "Wanda" in capsys.readouterr().err
    assert main([*base, "--calibration", text, "--calibration-samples", "4", "--calibration-len", "128"]) == 0
    pruned, _ = lf.load(tmp_path / "w")
    assert float((pruned.model.layers[2].mlp.gate_up_proj.weight == 0).float().mean()) == 0.5


def test_lowrank_whitening_beats_plain_svd_and_reloads(stories, tmp_path):
    """Whitened SVD's output error on correlated inputs is far below plain SVD's at the same rank; a
    LowRank model saves and reloads to the same logits (ranks follow from config + shapes), and a later
    int8 stage quantizes the two factors."""
    from leanformer.compress import LowRank
    from leanformer.compress.lowrank import LowRankLinear, factorize

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(
        2000, 64, generator=gen
    )
    w = torch.randn(64, 64, generator=gen)
    up, down = factorize(w, x.T @ x, 16, 0.01)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :16] * s[:16]) @ vh[:16]
    assert (x @ (w - up @ down).T).norm() < 0.1 * (x @ (w - plain).T).norm()

    path, calib, heldout, base = stories
    with pytest.raises(LeanformerError, match=r"ratio must be in \(0, 1\)"):
        apply(base, LowRank(ratio=1.0))
    with pytest.raises(LeanformerError, match="leaves rank 0"):
        apply(base, LowRank(ratio=0.1, multiple=64))  # checked before asking for calibration
    model, tok = lf.load(path, fast=False)
    apply(model, LowRank(ratio=0.9, multiple=8, targets=["mlp.*"], keep="smaller"), calib, progress=False)
    lr = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(lr, LowRankLinear) and lr.rank == 48  # 0.9 * 344 * 64 / 408 -> 48
    ppl = evaluate(model, heldout, 256, progress=False).perplexity
    assert ppl < 3 * evaluate(base, heldout, 256, progress=False).perplexity  # measured 12.6 vs 5.34
    lf.save(model, tok, tmp_path / "lr")
    again, _ = lf.load(tmp_path / "lr")
    ids = torch.tensor([heldout[:64]])
    assert torch.equal(model(ids), again(ids))
    apply(again, Int8WeightOnly())
    assert isinstance(again.model.layers[0].mlp.down_proj.up, Int8Linear)


def test_lowrank_speed_gate_keeps_slow_layers_dense_and_reloads_the_same(stories, tmp_path, monkeypatch):
    """keep="faster" (the default) factorises only Linears whose factorised form timed faster; the
    others stay dense and are named in the saved recipe's ignore, so a reload rebuilds the same model;
    when none wins, one line says so. Plain SVD (whiten=False) is the baseline whitening must beat."""
    from leanformer.compress import LowRank, lowrank
    from leanformer.compress.lowrank import LowRankLinear

    path, calib, heldout, base = stories
    with pytest.raises(LeanformerError, match="keep must be"):
        apply(base, LowRank(keep="fastest"))
    timed = []

    def fake_timing(lin, rank):  # deterministic: the wide gate_up (N > K) "wins", down_proj does not
        timed.append((lin.out_features, lin.in_features))
        return lin.out_features > lin.in_features, 1.5 if lin.out_features > lin.in_features else 0.8

    monkeypatch.setattr(lowrank, "faster_when_factorised", fake_timing)
    model, tok = lf.load(path, fast=False)
    cfg = LowRank(ratio=0.5, multiple=8, targets=["mlp.*"])
    apply(model, cfg, calib, progress=False)
    assert len(timed) == 2  # one timing per distinct shape, not per layer
    mlp = [(n, m) for n, m in model.named_modules() if n.endswith(("gate_up_proj", "down_proj"))]
    assert all(isinstance(m, LowRankLinear) == n.endswith("gate_up_proj") for n, m in mlp)
    assert all(n in cfg.ignore for n, _ in mlp if n.endswith("down_proj"))
    lf.save(model, tok, tmp_path / "gated")
    again, _ = lf.load(tmp_path / "gated")
    ids = torch.tensor([heldout[:64]])
    assert torch.equal(model(ids), again(ids))
    monkeypatch.setattr(lowrank, "faster_when_factorised", lambda lin, rank: (False, 0.7))
    with pytest.raises(LeanformerError, match=r"no targeted Linear runs faster.*0\.70x.*keep='smaller'"):
        apply(lf.load(path, fast=False)[0], LowRank(ratio=0.5, multiple=8), calib, progress=False)
    ppl = {}
    for whiten in (True, False):
        m, _ = lf.load(path, fast=False)
        apply(
            m,
            LowRank(ratio=0.5, multiple=8, targets=["mlp.*"], keep="smaller", whiten=whiten),
            calib,
            progress=False,
        )
        ppl[whiten] = evaluate(m, heldout, 256, progress=False).perplexity
    assert ppl[True] < ppl[False]


def test_cli_rejects_a_bad_recipe_file_before_loading(tmp_path, capsys):
    from leanformer.cli.main import main

    recipe = tmp_path / "r.json"
    recipe.write_text('[{"type": "SparseGPT", "pattern": "8:4"}]')
    args = ["compress", str(tmp_path / "no-such-model"), "--recipe", str(recipe), "-o", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "0 < N < M" in err and len(err.splitlines()) == 1  # the config, not the missing model


def test_lowrank_presets(shared, tmp_path, capsys):
    """svd-20 / lowrank-50 name LowRank stages; the CLI asks for calibration first, and on a model too
    narrow for the rank multiple says so in one line before any calibration."""
    from leanformer.cli.main import main
    from leanformer.compress import LowRank

    assert load_recipe("svd-20").stages == [LowRank(ratio=0.8, keep="smaller")]
    assert load_recipe("lowrank-50").stages == [LowRank(ratio=0.5, keep="faster")]
    model = str(shared / "models/stories260K")
    text = str(shared / "data/tinystories/sample.txt")
    base = ["compress", model, "--recipe", "svd-20", "-o", str(tmp_path / "s"), "--no-speed"]
    assert main(base) == 2
    assert "LowRank" in capsys.readouterr().err
    assert main([*base, "--calibration", text, "--calibration-samples", "2", "--calibration-len", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "leaves rank 0 (below multiple 32)" in err[-1] and "raise ratio" in err[-1]
    assert not (tmp_path / "s").exists()
