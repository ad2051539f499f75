"""The hardware's own limit, for MFU: model FLOP/s achieved / peak FLOP/s of the devices.

Accelerators: the vendor's dense peak per chip (bf16; f32 matmuls on TPU run as bf16 passes,
on NVIDIA GPUs as TF32 at half the bf16 rate). CPUs and unknown devices: a large matmul
measured on the spot, so MFU reads "fraction of what this machine's matmul can do".
"""

import re
import time

import jax
import jax.numpy as jnp

# device_kind prefix -> dense bf16 FLOP/s per device (jax device).
PEAK_BF16 = {
    "TPU v2": 22.5e12,  # per core; jax exposes each core as a device
    "TPU v3": 61.5e12,  # per core
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 70e12,
}


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """FLOP/s of an n x n x n matmul, best of `repeats` timed runs after a warm-up."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of all devices of the run together, where the figure comes from)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix in sorted(PEAK_BF16, key=len, reverse=True):  # the most specific name first
        if kind.startswith(prefix):
            peak = PEAK_BF16[prefix]
            if dtype == "float32" and device.platform == "gpu":
                peak /= 2  # TF32 tensor cores
            return peak * jax.device_count(), f"spec:{prefix}"
    # CPU: fake devices share the host's cores, so one matmul (on all cores) is the host's peak.
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    return matmul_peak(dtype=jdtype, device=device) * jax.process_count(), f"measured:{device.platform}-matmul-{dtype}"


def bf16_dots_upcast() -> bool:
    """Whether the default backend's compiler turns a bf16 matmul into an f32 one (converts
    around an f32 dot). XLA:CPU in jaxlib 0.10.2 does, with every oneDNN / XNNPACK flag: no AMX
    or AVX512-BF16 dots, so bf16 only adds the converts."""
    x = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    hlo = jax.jit(lambda a, b: a @ b).lower(x, x).compile().as_text()
    return re.search(r"= f32\[64,64\]\S* dot\(", hlo) is not None


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {key: value}; empty where unreadable."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:  # the first processor's block ends
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    return fields


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's `model name`, with its family and model
    numbers, since a VM guest may name only the vendor, "AMD EPYC"; elsewhere platform's guess)."""
    import platform

    fields = _cpuinfo(cpuinfo)
    name = fields.get("model name")
    if name:
        ids = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if key in fields]
        return f"{name} ({', '.join(ids)})" if ids else name
    return platform.processor() or platform.machine()


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's matmul-relevant instruction sets (bf16 and wide vectors), from /proc/cpuinfo."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags = _cpuinfo(cpuinfo).get("flags", "").split()
    return [w for w in wanted if w in flags]
