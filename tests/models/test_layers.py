"""models/layers.py pieces on their own."""

import torch

from leanformer.models.layers import Rotary
from tests.formats.test_gguf import LLAMA3


def test_rotary_table_rows_equal_the_formula():
    """Decode steps read cos/sin from a table; its rows must be the formula's values bit for bit
    (prefill computes directly, and a KV entry's rotation must not depend on which path made it)."""
    for theta, scaling in ((10000.0, None), (500000.0, LLAMA3)):
        rot = Rotary(64, theta, scaling)
        cases = (
            torch.tensor([[5]]),
            torch.tensor([[0], [300], [Rotary.TABLE_POSITIONS - 1]]),  # grows the table twice
            torch.arange(7)[None],
            torch.randint(0, Rotary.TABLE_POSITIONS, (8, 1)),
        )
        for pos in cases:
            cos, sin = rot(pos, torch.float32)
            ref_cos, ref_sin = rot.tables(pos)
            assert cos.shape == (*pos.shape, 1, 64)
            assert torch.equal(cos, ref_cos.unsqueeze(-2)) and torch.equal(sin, ref_sin.unsqueeze(-2))


def test_rotary_direct_past_the_table_and_for_long_steps():
    rot = Rotary(32, 10000.0, None)
    far = torch.tensor([[Rotary.TABLE_POSITIONS + 10]])
    long_step = torch.arange(Rotary.TABLE_MAX_ROWS + 1)
    for pos in (far, long_step):
        cos, sin = rot(pos, torch.float32)
        assert torch.equal(cos, rot.tables(pos)[0].unsqueeze(-2))
    assert rot._table is None or rot._table.shape[0] <= Rotary.TABLE_POSITIONS


def test_rotary_table_follows_dtype_changes():
    rot = Rotary(16, 10000.0, None)
    rot(torch.tensor([[3]]), torch.float32)
    assert rot._table is not None
    rot.double()  # .to() / .double() replace inv_freq: the table is rebuilt from it
    assert rot._table is None
    cos, _ = rot(torch.tensor([[3]]), torch.float32)
    assert cos.dtype == torch.float32


def test_meta_construction_computes_nothing_on_meta():
    """Embeddings and RoPE built on the meta device (loading.skeleton) skip meta arithmetic, whose first
    use imports torch._dynamo (~1 s of a process's first load); the values are what CPU gives."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from leanformer.models.layers import Rotary, embedding\n"
        "with torch.device('meta'):\n"
        "    e, r = embedding(50, 8), Rotary(16, 10000.0, None)\n"
        "assert e.weight.is_meta and r.inv_freq.is_meta\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
    cpu = Rotary(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})  # fmt: skip
    with torch.device("meta"):
        meta = Rotary(*cpu.spec)
    assert meta.inv_freq.is_meta and meta.inv_freq.shape == cpu.inv_freq.shape
    meta.to_empty(device="cpu")
    meta.build()  # what the loader does after assigning the weights
    assert torch.equal(meta.inv_freq, cpu.inv_freq)
