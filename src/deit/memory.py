"""Per-device memory of the train step, from XLA's memory analysis, without allocating anything.

The step is the one the trainer runs (same optimiser, state shardings and train step), lowered
with abstract inputs (ShapeDtypeStructs carrying their NamedShardings: `steps.abstract_state`,
the layout `steps.create_state` allocates) at the recipe's global
batch and compiled for a mesh of N devices. Here those are fake CPU devices, which only exist if
`XLA_FLAGS=--xla_force_host_platform_device_count=N` is set before JAX starts: `report_subprocess`
runs `python -m deit.memory N` with it (config JSON on stdin, report JSON on stdout). The figures
are the CPU compiler's; a TPU/GPU compile fuses and schedules differently, so treat them as estimates.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deit import optim, sharding
from deit.config import Config, check_divisible, from_dict
from deit.model import skeleton
from deit.steps import abstract_state, make_train_step

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
GIB = 2**30


def abstract_batch(cfg: Config, mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The global train batch the loader feeds: uint8 images [B, S, S, 3] and int32 labels [B]."""
    b, s = cfg.data.train_batch_size, cfg.model.image_size
    split = sharding.batch_sharding(mesh)
    return (jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=split),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=split))


def compile_train_step(cfg: Config, mesh: Mesh) -> tuple[Any, float, float]:
    """(compiled train step, trace+lower seconds, XLA compile seconds) for `mesh`."""
    opt = optim.build(cfg, skeleton(cfg.model))
    state, static, shardings = abstract_state(cfg, mesh, opt.tx)
    step_fn = make_train_step(cfg, opt.tx, opt.schedule, shardings).__wrapped__

    # filter_jit cannot take ShapeDtypeStructs (it would treat them as static), so jit the
    # unwrapped step over the array leaves, donating them as `donate="all"` does.
    def arrays_step(arrays, images, labels):
        new, metrics = step_fn(eqx.combine(arrays, static), images, labels)
        return eqx.filter(new, eqx.is_array), metrics

    t0 = time.perf_counter()
    lowered = jax.jit(arrays_step, donate_argnums=(0, 1, 2)).lower(state, *abstract_batch(cfg, mesh))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def memory_stats(compiled: Any) -> dict[str, int]:
    """Bytes per device from XLA's analysis; `total` = arguments + outputs - aliased (donated) + temps + code."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    stats = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
             "generated_code": m.generated_code_size_in_bytes}
    stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"] + stats["generated_code"]
    return {k: int(v) for k, v in stats.items()}


def report(cfg: Config, n: int) -> dict[str, Any]:
    """Per-device memory and compile time of the train step on the first `n` local devices."""
    if len(jax.devices()) < n:
        raise ValueError(f"memory_report={n} needs {n} devices, JAX has {len(jax.devices())} "
                         f"(set XLA_FLAGS={DEVICE_COUNT_FLAG}={n} before JAX starts)")
    check_divisible("train_batch_size", cfg.data.train_batch_size, n * cfg.optim.grad_accum,
                    f"devices x grad_accum = {n} x {cfg.optim.grad_accum}")
    mesh = sharding.make_mesh(cfg.fsdp, jax.devices()[:n])
    compiled, lower_s, compile_s = compile_train_step(cfg, mesh)
    stats = memory_stats(compiled)
    out = {"backend": f"{jax.default_backend()} (XLA {jax.default_backend().upper()} compiler estimates, "
                      f"not TPU/GPU figures)",
           "devices": n, "mesh": dict(mesh.shape), "global_batch": cfg.data.train_batch_size,
           "per_device_batch": cfg.data.train_batch_size // n, "grad_ckpt": cfg.model.grad_ckpt,
           "bytes_per_device": stats, "gib_per_device": {k: round(v / GIB, 3) for k, v in stats.items()},
           "lower_s": round(lower_s, 2), "xla_compile_s": round(compile_s, 2),
           "compile_s": round(lower_s + compile_s, 2)}
    if cfg.distill.distillation_type != "none":  # its architecture is only known once its checkpoint is read
        out["note"] = "the distillation teacher (replicated, forward only) is not included"
    return out


def device_env(n: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` with XLA faking exactly `n` CPU devices (any other XLA flags kept) and CPU as the platform."""
    env = dict(os.environ if env is None else env)
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    src = str(Path(__file__).resolve().parents[1])  # so `-m deit.memory` resolves to this package
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def report_subprocess(cfg: Config, n: int, timeout: float | None = None) -> dict[str, Any]:
    """`report` in a fresh process with `n` fake CPU devices (this process's JAX may have started already)."""
    r = subprocess.run([sys.executable, "-m", "deit.memory", str(n)], input=cfg.to_json(), env=device_env(n),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        lines = r.stderr.strip().splitlines()
        why = lines[-1].removeprefix("error: ") if lines else f"exit status {r.returncode}"
        # exit 2: the config does not fit the mesh (a user error); anything else is a failure
        raise (ValueError if r.returncode == 2 else RuntimeError)(f"memory report on {n} devices: {why}")
    return json.loads(r.stdout)


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: python -m deit.memory N < config.json  (with XLA_FLAGS faking N devices)")
    cfg = from_dict(json.loads(sys.stdin.read()))
    try:
        print(json.dumps(report(cfg, int(sys.argv[1]))))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
