"""bench.pruned: a SparseStorage folder is benched dense and (through a view of the same file) with
memory "sparse"; every row gets a file size and a decode ratio to the base."""

from __future__ import annotations

import json

import pytest

from leanformer.compress import Magnitude, apply
from leanformer.compress.sparse import SparseStorage
from leanformer.loading import load, save
from leanformer.measure.bench.pruned import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_pruned_rows(shared, tmp_path):
    stories = shared / "models/stories260K"
    model, tok = load(stories)
    apply(model, [Magnitude(sparsity=0.5), SparseStorage()], progress=False)
    save(model, tok, tmp_path / "m50")
    out = tmp_path / "r.json"
    args = [str(stories), str(tmp_path / "m50"), "--sparse-memory", "--module-path", "--no-rss"]
    assert main([*args, "--rounds", "1", "--new-tokens", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {
        f"{stories} [dense]",
        *(f"{tmp_path / 'm50'} [{m}]" for m in ("dense", "sparse", "module path")),
    }
    assert rows[f"{stories} [dense]"]["vs_base"] == 1.0
    assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert (
        rows[f"{tmp_path / 'm50'} [sparse]"]["file_mb"] == rows[f"{tmp_path / 'm50'} [dense]"]["file_mb"] > 0
    )
