"""`--dry-run --memory-report N`: XLA's per-device memory of the real train step, on fake devices."""

import dataclasses
import json
import math
import subprocess
import sys

from pathlib import Path

import equinox as eqx
import jax
import pytest

from deit import memory, optim, recipes, sharding, steps
from deit.model import ViT

ROOT = Path(__file__).resolve().parents[1]


def with_(cfg, fsdp=1, grad_ckpt=False):
    return dataclasses.replace(cfg, fsdp=fsdp, model=dataclasses.replace(cfg.model, grad_ckpt=grad_ckpt))


@pytest.fixture(scope="module")
def tiny():
    return recipes.load("tiny-digits")


@pytest.fixture(scope="module")
def reports(tiny):
    """In-process reports on 2 of conftest's 8 fake devices, keyed (fsdp, grad_ckpt)."""
    return {(f, g): memory.report(with_(tiny, f, g), 2) for f, g in ((1, False), (1, True), (2, False))}


def test_cli_adds_the_report_to_the_dry_run_json():
    r = subprocess.run([sys.executable, "src/train.py", "recipes:tiny-digits", "--dry-run", "--memory-report", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["memory"]
    assert m["backend"].startswith("cpu") and "estimate" in m["backend"]
    assert (m["devices"], m["mesh"], m["global_batch"], m["per_device_batch"]) == (2, {"data": 2, "fsdp": 1}, 64, 32)
    b = m["bytes_per_device"]
    assert b["total"] == b["argument"] + b["output"] - b["alias"] + b["temp"] + b["generated_code"]
    assert b["temp"] > 0 and b["alias"] > 0  # the donated state is reused for the new one
    assert 0 < m["lower_s"] <= m["compile_s"] and m["compile_s"] == pytest.approx(m["lower_s"] + m["xla_compile_s"], abs=0.02)


def test_arguments_are_the_sharded_state_and_batch(tiny, reports):
    """XLA's argument bytes = our per-device shards of the train state (params, Adam moments,
    counters) plus the batch split over the devices."""
    mesh = sharding.make_mesh(2, jax.devices()[:2])
    opt = optim.build(tiny, eqx.filter_eval_shape(ViT, tiny.model, key=jax.random.key(0)))
    state, _, _ = steps.abstract_state(with_(tiny, 2), mesh, opt.tx)
    shard_bytes = lambda x: math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    s, b = tiny.model.image_size, tiny.data.train_batch_size // 2
    expected = sum(map(shard_bytes, jax.tree.leaves(state))) + b * s * s * 3 + b * 4
    assert reports[2, False]["bytes_per_device"]["argument"] == expected
    assert reports[2, False]["bytes_per_device"]["argument"] < reports[1, False]["bytes_per_device"]["argument"]


def test_grad_ckpt_trades_activations_for_recompute(reports):
    with_ckpt, without = reports[1, True]["bytes_per_device"], reports[1, False]["bytes_per_device"]
    assert with_ckpt["argument"] == without["argument"]
    assert with_ckpt["temp"] < 0.5 * without["temp"]


def test_fsdp_does_not_grow_per_device_memory(reports):
    """Activations stay batch-sharded inside the block scan (sharding.constrain_batch); before,
    XLA sharded them over features and kept the whole batch on every device."""
    assert reports[2, False]["bytes_per_device"]["total"] <= reports[1, False]["bytes_per_device"]["total"]


def test_a_mesh_that_does_not_fit_the_config_exits_2():
    r = subprocess.run([sys.executable, "src/train.py", "recipes:tiny-digits", "--dry-run", "--memory-report", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("error: memory report on 3 devices: train_batch_size=64 is not divisible by "
                                "devices x grad_accum = 3 x 1")


def test_report_needs_the_devices(tiny):
    with pytest.raises(ValueError, match="memory_report=9 needs 9 devices, JAX has 8"):
        memory.report(tiny, 9)


def test_device_env_sets_exactly_one_device_count():
    env = memory.device_env(32, {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8",
                                 "PYTHONPATH": "/x"})
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=32"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["PYTHONPATH"].split(":") == [str(ROOT / "src"), "/x"]
