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
