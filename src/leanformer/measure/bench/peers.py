"""Peer engines in `leanformer bench --peers ...`: the same weights in each peer's format, each peer
measured in its own process, taking turns with leanformer in the same run.

    llama.cpp           the GGUF file itself (MODEL must be a .gguf), via llama-cpp-python's C API
    onnxruntime[:int8]  our decoder exporter (export/decoder.py) → ONNX Runtime; :int8 = its dynamic quantization
    ctranslate2[:int8]  HF transformers folder of the same weights → CTranslate2's converter
    transformers        HF transformers on the same weights (measure/reference.py)

Conversion runs in a process of its own (it loads torch and the model), measurement in another
(peer_worker.py, which imports neither torch nor leanformer, so peak RSS is the peer's own), which then
takes turns with ours (turns.py). A peer whose package is missing, whose conversion fails or whose
process crashes becomes a row with the reason; the run goes on.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from leanformer.errors import LeanformerError
from leanformer.measure.bench.turns import TIMEOUT_S, Contender, last_line, start_process

PACKAGES = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime", "ctranslate2": "ctranslate2"}
PACKAGES["transformers"] = "transformers"
PIP = {"llama.cpp": "llama-cpp-python", "onnxruntime": "onnxruntime", "ctranslate2": "ctranslate2"}
PIP["transformers"] = "transformers"
VARIANTS = {"llama.cpp": [""], "onnxruntime": ["", "int8"], "ctranslate2": ["", "int8"], "transformers": [""]}
WORKER = Path(__file__).with_name("peer_worker.py")


def machine() -> dict:
    """Where a bench ran: kernels.cpu.describe() (CPU model, ISA flags, the path of each op, threads)
    and its one-line summary, stored with every bench / report result."""
    from leanformer.kernels import cpu

    return cpu.describe() | {"summary": cpu.summary()}


def parse_peers(text: str) -> list[str]:
    """'llama.cpp,onnxruntime:int8' → ['llama.cpp', 'onnxruntime:int8']; unknown names refused."""
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, variant = spec.partition(":")
        if name not in VARIANTS or variant not in VARIANTS[name]:
            known = ", ".join(f"{n}:{v}" if v else n for n in VARIANTS for v in VARIANTS[n])
            raise LeanformerError(f"unknown peer {spec!r}; known: {known}")
        if spec not in out:
            out.append(spec)
    if not out:
        raise LeanformerError("--peers needs at least one peer name")
    return out


def missing(peer: str) -> str | None:
    """Why the peer cannot run here (its package is not installed), or None."""
    name = peer.partition(":")[0]
    if importlib.util.find_spec(PACKAGES[name]) is None:
        return f"not installed (pip install {PIP[name]}, or leanformer[peers])"
    return None


def gguf_kind(path: Path) -> str:
    """The GGUF's most common 2-D tensor type (Q4_0, Q8_0, F32, ...): what llama.cpp runs."""
    import collections

    from leanformer.formats.gguf_index import GGUFIndex

    kinds = collections.Counter(t.tensor_type.name for t in GGUFIndex(path).tensors if len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else "?"


def convert(peer: str, model: str, work: str) -> str:
    """The peer's model for MODEL, written under `work`; returns its path. Runs in its own process."""
    name, _, variant = peer.partition(":")
    src, out = Path(model), Path(work)
    if name == "llama.cpp":
        if src.suffix != ".gguf":
            raise LeanformerError(
                "llama.cpp runs GGUF files: give MODEL as a .gguf (llama.cpp's convert_hf_to_gguf.py makes one)"
            )
        return str(src)
    if name == "onnxruntime":
        from leanformer.export.decoder import ONNX_FILE, export_decoder_onnx
        from leanformer.loading import load

        model_, _ = load(src, keep_quantized=False)  # ONNX has no form for our int modules: float weights
        export_decoder_onnx(model_, out / "fp32")
        if not variant:
            return str(out / "fp32" / ONNX_FILE)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        (out / "int8").mkdir()
        (out / "int8" / "config.json").write_text((out / "fp32" / "config.json").read_text())
        quantize_dynamic(out / "fp32" / ONNX_FILE, out / "int8" / ONNX_FILE, weight_type=QuantType.QInt8)
        return str(out / "int8" / ONNX_FILE)
    if name == "ctranslate2":
        import ctranslate2

        from leanformer.measure.reference import load_hf_reference

        hf, tok = load_hf_reference(src)
        hf.save_pretrained(out / "hf")
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(out / "hf")  # the converter reads the vocabulary from the tokenizer
        del hf
        conv = ctranslate2.converters.TransformersConverter(str(out / "hf"))
        return conv.convert(str(out / "ct2"), quantization=variant or "float32")
    raise LeanformerError(f"no converter for peer {peer!r}")


def _subprocess(argv: list[str], what: str) -> str:
    """stdout of a child; its last stderr line (or the signal) as the error when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took more than {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else last_line(proc.stderr)[:300]
        raise RuntimeError(f"{what} failed: {how}")
    return proc.stdout


def _convert_in_child(peer: str, model: str, work: str) -> str:
    code = (
        "import sys; from leanformer.measure.bench.peers import convert; "
        "print(convert(sys.argv[1], sys.argv[2], sys.argv[3]))"
    )
    out = _subprocess([sys.executable, "-c", code, peer, model, work], "conversion")
    return last_line(out)


def _label(peer: str, model: str) -> str:
    name, _, variant = peer.partition(":")
    if name == "llama.cpp" and model.endswith(".gguf"):
        try:
            return gguf_kind(Path(model))
        except Exception:
            return "GGUF"
    return variant or "float32"


def peer_contender(cfg, peer: str, work: str, worker: Path = WORKER) -> Contender:
    """The peer's turns.Contender: converted into `work` now (in a child process), measured later in
    its own; a missing package or a failed conversion is a row with the reason already."""
    from dataclasses import asdict

    row = {"engine": peer, "label": peer, "dtype": _label(peer, cfg.model)}
    if reason := missing(peer):
        return Contender(row | {"error": reason}, start=None)
    if peer == "transformers":
        from leanformer.measure.bench import runner

        c = runner.contender(cfg, "transformers")
        c.row["label"] = peer
        return c
    try:
        path = _convert_in_child(peer, cfg.model, work)
    except Exception as e:
        return Contender(row | {"error": str(e)}, start=None)
    argv = [sys.executable, str(worker), peer.partition(":")[0], path, json.dumps(asdict(cfg))]
    return Contender(row, start_process(argv, "measurement"))


def run_peer(cfg, peer: str, worker: Path = WORKER) -> dict:
    """One peer's row measured alone: its figures, or {"error": reason} with the name; never raises."""
    from leanformer.measure.bench.turns import take_turns

    with tempfile.TemporaryDirectory(prefix="leanformer-peer-") as work:
        return take_turns(cfg, [peer_contender(cfg, peer, work, worker)])[0]
