"""kernels/cpu.py's run-time choices: where bf16 GEMMs pay (AMX; AVX-512 BF16 on AMD, not on Intel without AMX)."""

from __future__ import annotations

import pytest
import torch

from leanformer.kernels import cpu

AMD = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
INTEL = "vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"


@pytest.mark.parametrize(
    "amx,avx512_bf16,text,pays",
    [
        (True, True, INTEL, True),  # AMX tiles: oneDNN's AMX bf16 GEMMs
        (False, True, AMD, True),  # Zen 4 / 5: vdpbf16ps at twice fp32's FMA rate
        (False, True, INTEL, False),  # one vdpbf16ps port: 0.55-0.7x fp32 (session 28)
        (False, False, AMD, False),  # emulated bf16
    ],
)
def test_bf16_pays_where_measured(monkeypatch, amx, avx512_bf16, text, pays):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu.bf16_pays(text) is pays
    assert cpu.native_bf16() is (amx or avx512_bf16)


def test_bf16_pays_on_this_machine_is_a_bool():
    assert isinstance(cpu.bf16_pays(), bool)
