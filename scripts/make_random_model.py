"""Write a random-weight HF-style checkpoint (config.json + sharded safetensors + index) at a real
model's shape, shard by shard, so this script itself never holds more than one shard.

Memory and speed figures do not depend on weight values, so these stand in for models we cannot
download (see docs/BENCHMARKS.md). Usage:

    python scripts/make_random_model.py --shape qwen2.5-0.5b --dtype float32 -o /tmp/qwen05
    python scripts/make_random_model.py --shape llama-3.2-3b --dtype bfloat16 -o /tmp/llama3b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, tied, architecture, q/k/v bias
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True, "Qwen2ForCausalLM", True),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True, "LlamaForCausalLM", False),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, True, "LlamaForCausalLM", False),
    "tiny": (64, 3, 4, 2, 160, 300, True, "LlamaForCausalLM", False),
}


def config_for(shape: str, dtype: str) -> dict:
    hidden, layers, heads, kv, inter, vocab, tied, arch, _ = SHAPES[shape]
    return {
        "architectures": [arch],
        "model_type": "qwen2" if arch.startswith("Qwen2") else "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }


def tensors(shape: str, seed: int):
    """(HF name, shape, kind) in file order; kind "norm" tensors are ones, "w" normal * 0.02."""
    hidden, layers, heads, kv, inter, vocab, tied, _, bias = SHAPES[shape]
    head_dim = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden), "w"
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,), "norm"
        for n, rows in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            yield p + f"self_attn.{n}_proj.weight", (rows, hidden), "w"
            if bias:
                yield p + f"self_attn.{n}_proj.bias", (rows,), "w"
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim), "w"
        yield p + "post_attention_layernorm.weight", (hidden,), "norm"
        yield p + "mlp.gate_proj.weight", (inter, hidden), "w"
        yield p + "mlp.up_proj.weight", (inter, hidden), "w"
        yield p + "mlp.down_proj.weight", (hidden, inter), "w"
    yield "model.norm.weight", (hidden,), "norm"
    if not tied:
        yield "lm_head.weight", (vocab, hidden), "w"


def write(shape: str, dtype: str, out: Path, shard_mb: int = 1000, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({n: name for n in shard})
        shard, size = {}, 0

    for name, dims, kind in tensors(shape, seed):
        t = torch.ones(dims, dtype=dt) if kind == "norm" else (torch.randn(dims, generator=gen) * 0.02).to(dt)
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_mb << 20:
            flush()
    if shard:
        flush()
    n = len(shards)
    for i, old in enumerate(shards):  # HF's naming: model-0000i-of-0000n.safetensors
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / old).rename(out / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in set(weight_map.values()))}}
    (out / "model.safetensors.index.json").write_text(
        json.dumps(index | {"weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config_for(shape, dtype), indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--shard-mb", type=int, default=1000)
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    a = p.parse_args()
    if a.layers:
        s = SHAPES[a.shape]
        SHAPES[a.shape] = (s[0], a.layers, *s[2:])
    print(write(a.shape, a.dtype, Path(a.output), a.shard_mb))


if __name__ == "__main__":
    main()
