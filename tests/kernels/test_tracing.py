"""kernels.tracing(): what every compiled path asks before it runs (ONNX export, TorchScript tracing)."""

from __future__ import annotations

import io

import torch
from torch import nn

from leanformer import kernels

SEEN: list[bool] = []  # module level: torch.export drops side effects on the module's own attributes


class _Spy(nn.Module):
    seen = SEEN

    def forward(self, x):
        SEEN.append(kernels.tracing())
        return x * 2


def test_tracing_is_true_only_while_a_graph_is_recorded():
    spy = _Spy()
    spy(torch.ones(2))
    assert spy.seen == [False]
    for dynamo in (False, True):  # both ONNX exporters
        spy.seen.clear()
        torch.onnx.export(spy, (torch.ones(2),), io.BytesIO(), dynamo=dynamo)
        assert spy.seen and all(spy.seen)
    spy.seen.clear()
    torch.jit.trace(spy, (torch.ones(2),), check_trace=False)
    assert spy.seen == [True]
    spy.seen.clear()
    spy(torch.ones(2))
    assert spy.seen == [False]


def test_the_onnx_flag_is_read_as_the_public_call_reads_it(monkeypatch):
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    assert torch.onnx.is_in_onnx_export() and kernels.tracing()
    monkeypatch.setattr(GLOBALS, "in_onnx_export", False)
    assert not torch.onnx.is_in_onnx_export() and not kernels.tracing()
