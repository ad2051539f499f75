"""Peak FLOP/s for MFU: vendor figures on accelerators, a measured matmul on CPUs."""

import jax

from deit import hardware


def test_peak_flops_on_cpu_is_measured():
    peak, source = hardware.peak_flops("float32")
    assert source == "measured:cpu-matmul-float32" and 1e8 < peak < 1e14


def test_spec_table_most_specific_name_wins(monkeypatch):
    class Fake:
        platform, device_kind = "gpu", "NVIDIA H100 PCIe"

    monkeypatch.setattr(jax, "devices", lambda: [Fake()])
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert hardware.peak_flops("bfloat16") == (8 * 756e12, "spec:NVIDIA H100 PCIe")
    assert hardware.peak_flops("float32") == (8 * 756e12 / 2, "spec:NVIDIA H100 PCIe")
