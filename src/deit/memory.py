"""Per-device memory of the train step, from XLA's memory analysis, without allocating anything.

The step is the one the trainer runs (same optimiser, state shardings and train step), lowered
with abstract inputs (ShapeDtypeStructs carrying their NamedShardings: `steps.abstract_state`,
the layout `steps.create_state` allocates) at the recipe's global
batch and compiled for a mesh of N devices. Here those are fake CPU devices, which only exist if
`XLA_FLAGS=--xla_force_host_platform_device_count=N` is set before JAX starts: `report_subprocess`
runs `python -m deit.memory N` with it (config JSON on stdin, report JSON on stdout). The figures
are the CPU compiler's; a TPU/GPU compile fuses and schedules differently, so treat them as estimates.

With a TPU topology instead (`--memory-report-tpu v4:4x4x2`, `report_subprocess(cfg, "v4:4x4x2")`)
the step is compiled by the real TPU compiler, ahead of time, for the devices
`jax.experimental.topologies` describes: no TPU needed, only libtpu (`pip install -e ".[tpu]"`).
Those figures are the TPU's own; a step that does not fit the device's HBM does not compile
(`fits` false, with the compiler's figures: temporaries needed, HBM available); one that
compiles fits if its whole total (state, batch and temporaries) is within the device's HBM. The
AOT topology has one device per TensorCore on v4 (two per chip: 32 GiB shared, 16 each) and
one per chip on v5e, v5p (megacore) and v6e.
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
# HBM per chip by device_kind (Google Cloud's TPU specs); per device = per chip / devices per chip.
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


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
    out = _report(cfg, jax.devices()[:n])
    out["backend"] = (f"{jax.default_backend()} (XLA {jax.default_backend().upper()} compiler estimates, "
                      f"not TPU/GPU figures)")
    return out


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology such as 'v4:4x4x2' (v4-64) or 'v5e:4x4', for compiling only."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"memory_report_tpu={topology!r}: {why} (the TPU compiler comes with "
                         f"pip install -e \".[tpu]\")") from None


def tpu_report(cfg: Config, topology: str) -> dict[str, Any]:
    """Per-device (and per-chip) memory of the train step from the TPU compiler for `topology`."""
    devices = tpu_devices(topology)
    chips = 1
    for d in topology.split(":")[1].split("x"):
        chips *= int(d)
    kind, per_chip = devices[0].device_kind, len(devices) // chips
    try:
        out = _report(cfg, devices)
    except Exception as e:  # the TPU compiler refuses a step that does not fit the HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        first = next((line for line in msg.splitlines() if line.strip()), msg).strip()
        out = {"devices": len(devices), "global_batch": cfg.data.train_batch_size,
               "per_device_batch": cfg.data.train_batch_size // len(devices), "grad_ckpt": cfg.model.grad_ckpt,
               "fits": False, "error": first[:500]}
        # "... HLO temporaries (23.14G) exceeds available HBM (15.25G)": the compiler's own figures
        for key, pattern in (("temp_gib_needed", r"temporaries \(([0-9.]+)G\)"),
                             ("available_hbm_gib", r"available HBM \(([0-9.]+)G\)")):
            found = re.search(pattern, first)
            if found:
                out[key] = float(found.group(1))
    out.update(backend="tpu (the TPU compiler, ahead of time; no TPU used)", topology=topology,
               device_kind=kind, chips=chips, devices_per_chip=per_chip)
    if kind in TPU_HBM_GIB:
        out["hbm_gib_per_device"] = TPU_HBM_GIB[kind] / per_chip  # the spec; the compiler keeps some back
    if "gib_per_device" in out:
        # Compiled: the compiler checked its temporaries against the HBM, but not the state and
        # batch beside them (it compiled a DeiT-III H/14 in21k step needing 17.1 GiB of a 16 GiB
        # device), so the whole total is checked here.
        out["fits"] = out["gib_per_device"]["total"] <= out.get("hbm_gib_per_device", float("inf"))
        out["gib_per_chip"] = round(out["gib_per_device"]["total"] * per_chip, 3)
    return out


def _report(cfg: Config, devices: list) -> dict[str, Any]:
    n = len(devices)
    check_divisible("train_batch_size", cfg.data.train_batch_size, n * cfg.optim.grad_accum,
                    f"devices x grad_accum = {n} x {cfg.optim.grad_accum}")
    mesh = sharding.make_mesh(cfg.fsdp, devices)
    compiled, lower_s, compile_s = compile_train_step(cfg, mesh)
    stats = memory_stats(compiled)
    out = {"devices": n, "mesh": dict(mesh.shape), "global_batch": cfg.data.train_batch_size,
           "per_device_batch": cfg.data.train_batch_size // n, "grad_ckpt": cfg.model.grad_ckpt,
           "bytes_per_device": stats, "gib_per_device": {k: round(v / GIB, 3) for k, v in stats.items()},
           "lower_s": round(lower_s, 2), "xla_compile_s": round(compile_s, 2),
           "compile_s": round(lower_s + compile_s, 2)}
    if cfg.distill.distillation_type != "none":  # its architecture is only known once its checkpoint is read
        out["note"] = "the distillation teacher (replicated, forward only) is not included"
    return out


def device_env(n: int | str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` with CPU as the platform and XLA faking exactly `n` CPU devices (any other XLA flags
    kept); for a TPU topology `n`, libtpu's host checks quieted instead (no TPU is opened)."""
    env = dict(os.environ if env is None else env)
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    if isinstance(n, int):
        flags.append(f"{DEVICE_COUNT_FLAG}={n}")
    else:  # compile-only: libtpu still looks for a TPU host unless told what it is
        env.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
        env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        env.setdefault("TPU_SKIP_MDS_QUERY", "1")
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # a parent holding libtpu (TPU host or not) keeps its lockfile
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    src = str(Path(__file__).resolve().parents[1])  # so `-m deit.memory` resolves to this package
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def report_subprocess(cfg: Config, n: int | str, timeout: float | None = None) -> dict[str, Any]:
    """`report` in a fresh process with `n` fake CPU devices (this process's JAX may have started
    already), or `tpu_report` for a TPU topology name `n`."""
    r = subprocess.run([sys.executable, "-m", "deit.memory", str(n)], input=cfg.to_json(), env=device_env(n),
                       capture_output=True, text=True, timeout=timeout)
    what = f"{n} devices" if isinstance(n, int) else f"TPU topology {n}"
    if r.returncode:
        lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")] or \
            r.stderr.strip().splitlines()
        why = lines[-1].removeprefix("error: ") if lines else f"exit status {r.returncode}"
        # exit 2: the config does not fit the mesh (a user error); anything else is a failure
        raise (ValueError if r.returncode == 2 else RuntimeError)(f"memory report on {what}: {why}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    arg = sys.argv[1] if len(sys.argv) == 2 else ""
    if not (arg.isdigit() and int(arg) >= 1) and ":" not in arg:
        sys.exit("usage: python -m deit.memory N|TOPOLOGY < config.json  (N fake CPU devices via XLA_FLAGS, "
                 "or a TPU topology such as v4:4x4x2)")
    cfg = from_dict(json.loads(sys.stdin.read()))
    try:
        print(json.dumps(report(cfg, int(arg)) if arg.isdigit() else tpu_report(cfg, arg)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
