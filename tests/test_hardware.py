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


def test_cpu_model_names_family_and_model_from_the_first_processor(tmp_path):
    """A VM guest may report only the vendor ("AMD EPYC"): the family and model tell Zen 3/4/5 apart."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\n")
    assert hardware.cpu_model(str(info)) == "AMD EPYC (family 26, model 2)"
    assert hardware.cpu_features(str(info)) == ["avx2"]
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert hardware.cpu_model(str(info)) == "Some CPU"
    assert hardware.cpu_features(str(info)) == []
    assert hardware.cpu_features(str(tmp_path / "missing")) == []
