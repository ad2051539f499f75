"""Multi-controller training: 2 processes x 2 CPU devices (jax.distributed on localhost, gloo
collectives) with a (data 2, fsdp 2) mesh train like 1 process x 4 devices on the same
global batches; resuming with another process count works."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from deit import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2", "--fsdp", "2",
        "--log-interval", "1", "--eval-interval", "6", "--droppath", "0.1"]
STEPS = 6

# The reference: one process, 4 devices, fed the global batches the two processes form
# together (process 0's local rows, then process 1's: the order of their devices in the mesh).
REFERENCE = """
import json, sys
import equinox as eqx, jax, numpy as np
sys.path.insert(0, "src")
import train as cli
from deit import optim, sharding
from deit.data.loader import train_batches
from deit.model import ViT
from deit.steps import create_state, make_train_step
cfg = cli.parse(json.loads(sys.argv[1]))
mesh = sharding.make_mesh(cfg.fsdp)
opt = optim.build(cfg, eqx.filter_eval_shape(ViT, cfg.model, key=jax.random.key(0)))
state, shardings = create_state(cfg, mesh, opt.tx)
step = make_train_step(cfg, opt.tx, opt.schedule, shardings)
loaders = [train_batches(cfg, process_index=p, process_count=2) for p in range(2)]
losses = []
for _ in range(int(sys.argv[2])):
    parts = [next(loader) for loader in loaders]
    images, labels = (np.concatenate([p[i] for p in parts]) for i in range(2))
    state, m = step(state, *sharding.shard_batch(mesh, images, labels), None)
    losses.append(float(m["loss"]))
print(json.dumps(losses))
"""


def env(devices: int, cache: Path) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "DEIT_CACHE": str(cache)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_and_resume_with_another_count(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    subprocess.run([sys.executable, "-c", "from deit.data.prepare import ensure_digits; ensure_digits()"], cwd=ROOT, check=True,
                   env=env(1, cache), capture_output=True)  # both processes find the digits cache ready
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "src/train.py", *ARGS, "--training-steps", str(STEPS),
                               "--output-dir", str(out), "--coordinator-address", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env(2, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e

    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    assert [e["step"] for e in events if "train/loss" in e] == list(range(1, STEPS + 1))  # logged once
    val = [e for e in events if "val/acc1" in e]
    assert len(val) == 1 and val[0]["val/num_samples"] == 360  # exact over both processes

    ref = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(ARGS), str(STEPS)], cwd=ROOT,
                         env=env(4, cache), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    ref_losses = json.loads(ref.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)

    # One writer: a single complete checkpoint set, holding both processes' loader states.
    meta = checkpoint.read_meta(out / "checkpoints" / "last")
    assert meta["step"] == STEPS and meta["process_count"] == 2 and len(meta["loader_states"]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]

    # Resume the 2-process run in 1 process x 4 devices (the stream is replayed to the step).
    r = subprocess.run([sys.executable, "src/train.py", *ARGS, "--training-steps", str(STEPS + 2),
                        "--output-dir", str(out)], cwd=ROOT, env=env(4, cache), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"at step {STEPS}" in r.stdout
    assert checkpoint.read_meta(out / "checkpoints" / "last")["step"] == STEPS + 2
