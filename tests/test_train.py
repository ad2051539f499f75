"""The training entry points end to end: dry-run for every recipe, a short run, resume, evaluate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deit
from deit import recipes

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
import train as train_cli  # noqa: E402


def run_script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_dry_runs(name, capsys):
    train_cli.main([f"recipes:{name}", "--dry-run"])
    out = json.loads(capsys.readouterr().out)
    cfg = recipes.load(name)
    assert out["config"] == {**cfg.to_dict(), "dry_run": True}
    assert out["params"] == deit.count_params(cfg.model)
    assert out["flops"] == deit.forward_flops(cfg.model) > 0


def test_recipe_values_match_seed():
    seed = json.loads((ROOT.parent / "shared" / "seed" / "recipes.json").read_text()) \
        if (ROOT.parent / "shared" / "seed" / "recipes.json").exists() else None
    if seed is None:
        pytest.skip("shared/seed not beside this checkout")
    assert len(seed) == 33
    for name, flags in seed.items():
        flat = {}
        for key, value in recipes.load(name).to_dict().items():
            flat.update(value if isinstance(value, dict) else {key: value})
        for k, v in flags.items():
            assert flat[k] == v, (name, k)


def test_our_additions_apply_where_their_patterns_say():
    """`recipes/_additions.json` (this project's flags beyond deit3-jax's): L/16 and H/14 shard over
    all devices, DeiT-S and -B unroll their blocks, the rest keep the defaults; `flags` stays
    deit3-jax's file, and a user's flag still wins."""
    files = [p.stem for p in recipes.RECIPES_DIR.glob("*.json") if not p.stem.startswith("_")]
    sharded = sorted(n for n in files if recipes.load(n).fsdp == -1)
    assert sharded == sorted(n for n in files if n.startswith(("deit3-l16-", "deit3-h14-"))) and len(sharded) == 16
    unrolled = sorted(n for n in files if recipes.load(n).model.scan_unroll == -1)
    assert unrolled == ["deit-b16-224-in1k-300ep", "deit-s16-224-in1k-300ep"]
    for n in set(files) - set(sharded) - set(unrolled):
        assert recipes.load(n).fsdp == 1 and recipes.load(n).model.scan_unroll == 1, n
    assert recipes.load("deit3-h14-in1k").fsdp == -1  # through the alias too
    assert all("fsdp" not in recipes.flags(n) and "scan_unroll" not in recipes.flags(n) for n in files)
    assert all(entry["why"] for entry in json.loads((recipes.RECIPES_DIR / "_additions.json").read_text()).values())
    r = run_script("src/train.py", "recipes:deit3-h14-in1k", "--dry-run", "--fsdp", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["fsdp"] == 1


def test_bad_fsdp_is_one_line_exit_2():
    r = run_script("src/train.py", "recipes:tiny-digits", "--dry-run", "--fsdp", "0")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: fsdp=0: allowed -1 (all devices) or a device count >= 1", r.stderr


def test_dry_run_cli_and_overrides():
    r = run_script("src/train.py", "recipes:deit3-h14-in1k", "--dry-run", "--learning-rate", "0.5", "--droppath", "0.1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["optim"]["learning_rate"] == 0.5
    assert out["config"]["model"]["droppath"] == 0.1
    # timm's deit3_huge_patch14_224 has 632,126,440; at 154 px the grid is 11x11, not 16x16.
    assert out["params"] == 632126440 - (16 * 16 - 11 * 11) * 1280
    assert out["config"]["optim"]["warmup_steps"] == 3127


def test_bad_recipe_and_bad_value_exit_2():
    assert run_script("src/train.py", "recipes:nope", "--dry-run").returncode == 2
    assert run_script("src/train.py", "recipes:tiny-digits", "--image-size", "30", "--dry-run").returncode == 2


def test_unset_dataset_env_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GCS_DATASET_DIR"}
    r = subprocess.run([sys.executable, "src/train.py", "recipes:deit-t16-in1k", "--output-dir", str(tmp_path / "o")],
                       cwd=ROOT, env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "$GCS_DATASET_DIR is not set" in r.stderr


def test_short_training_run_resume_and_evaluate(tmp_path):
    out = tmp_path / "run"
    common = ["src/train.py", "recipes:tiny-digits", "--output-dir", str(out), "--log-interval", "5",
              "--eval-interval", "10", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]
    env = {"DEIT_CACHE": str(tmp_path / "cache")}
    r = run_script(*common, "--training-steps", "10", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model"]["layers"] == 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == [5, 10]
    # MFU against this CPU's measured matmul peak: a fraction, and consistent with TFLOP/s.
    for e in (e for e in events if "train/loss" in e):
        assert 0 < e["train/mfu"] < 1 and e["train/tflops_per_sec"] > 0
        assert 0 <= e["train/data_wait"] < 1  # a share of the window's wall time
    val = [e for e in events if "val/acc1" in e]
    assert len(val) == 1 and 0 <= val[0]["val/acc1"] <= 1 and val[0]["val/num_samples"] == 360
    assert (tmp_path / ".aim").is_dir()  # aim repo beside the run by default

    # The checkpoint is self-describing: deit.load_model rebuilds the model from it alone.
    model = deit.load_model(out / "checkpoints" / "last")
    assert model.cfg.layers == 2 and model.cfg.image_size == 32

    # Resume: the same command with more steps continues from step 10.
    r = run_script(*common, "--training-steps", "20", env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == [5, 10, 15, 20]

    r = run_script("src/evaluate.py", "--checkpoint", str(out / "checkpoints" / "last"),
                   "--valid-dataset-shards", "digits:valid", "--valid-batch-size", "64", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["num_samples"] == 360 and res["skipped"] == 0
    last_val = [e for e in events if "val/acc1" in e][-1]
    assert np.isclose(res["acc1"], last_val["val/acc1"]) and np.isclose(res["acc5"], last_val["val/acc5"])


def test_itstime_is_the_one_cadence_rule():
    from deit.trainer import itstime

    assert [s for s in range(1, 13) if itstime(s, 4)] == [4, 8, 12]
    assert [s for s in range(1, 11) if itstime(s, 4, last=10)] == [4, 8, 10]  # and always at the last step
    assert not any(itstime(s, 0) for s in range(1, 10))  # 0: never (checkpoint_interval, keep_interval)


def test_data_wait_is_the_share_of_wall_time_spent_waiting():
    from deit.trainer import Window

    w = Window()
    w.start -= 4.0  # the window began 4 s ago
    w.add({}, 32, 1.0)
    w.add({}, 32, 0.5)
    assert w.images == 64 and w.waited == 1.5
    w.reset()
    assert w.waited == 0.0 and w.images == 0


def test_train_step_compiles_once_per_run(tmp_path, caplog):
    """A run that logs, evaluates and checkpoints compiles its train step once, and so does the
    run that resumes it (counted from jax's compile log, in-process on the 8 fake devices)."""
    import logging

    import jax

    import train as train_cli

    out = tmp_path / "run"
    args = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2",
            "--log-interval", "2", "--eval-interval", "3", "--checkpoint-interval", "2", "--output-dir", str(out)]
    jax.config.update("jax_log_compiles", True)
    try:
        counts = []
        for steps in (6, 10):  # the second run resumes the first at step 6
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="jax"):
                train_cli.main([*args, "--training-steps", str(steps)])
            counts.append(sum("Compiling jit(step_fn)" in r.getMessage() for r in caplog.records))
    finally:
        jax.config.update("jax_log_compiles", False)
    assert counts == [1, 1]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == [2, 4, 6, 8, 10]
    assert [e["step"] for e in events if "val/acc1" in e] == [3, 6, 9, 10]


def test_bf16_on_cpu_runs_with_a_note_that_it_is_slower(tmp_path, capsys):
    """XLA:CPU (jaxlib 0.10.2) computes a bf16 matmul as converts around an f32 dot, so a bf16
    run on CPU is slower than f32 (README: Training throughput): the run says so on stderr and
    trains; an f32 run says nothing of it."""
    from deit import hardware

    assert hardware.bf16_dots_upcast()  # if a jaxlib stops upcasting, the note goes by itself
    args = ["recipes:tiny-digits", "--no-progress", "--layers", "1", "--dim", "32", "--heads", "2",
            "--training-steps", "2", "--log-interval", "2", "--eval-interval", "100"]
    for dtype, noted in (("bfloat16", True), ("float32", False)):
        out = tmp_path / dtype
        train_cli.main([*args, "--compute-dtype", dtype, "--output-dir", str(out)])
        assert ("note: compute_dtype='bfloat16' on CPU" in capsys.readouterr().err) is noted
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if "train/loss" in e] == [2]


def test_loop_dispatches_the_next_step_before_reading_the_last(tmp_path, monkeypatch):
    """Logging every step, the host still dispatches step N+1 before step N's metrics are
    ready: each step's loss is held back on the device by a deliberately slow callback
    (0.3 s), and every dispatch but the first must come before the previous step's loss exists.
    Only the last step, whose state the run then saves, is waited for."""
    import time

    import jax
    from jax.experimental import io_callback

    from deit import trainer

    dispatched: list[float] = []
    ready: dict[int, float] = {}
    real_make = trainer.make_train_step

    def record(loss, idx):
        time.sleep(0.3)
        ready[int(idx)] = time.perf_counter()
        return loss

    hold = jax.jit(lambda loss, idx: io_callback(record, jax.ShapeDtypeStruct(loss.shape, loss.dtype), loss, idx))

    def slow_make(*args, **kwargs):
        real = real_make(*args, **kwargs)

        def step(state, images, labels, teacher=None):
            dispatched.append(time.perf_counter())
            state, metrics = real(state, images, labels, teacher)
            return state, dict(metrics, loss=hold(metrics["loss"], np.int32(len(dispatched) - 1)))
        return step

    monkeypatch.setattr(trainer, "make_train_step", slow_make)
    train_cli.main(["recipes:tiny-digits", "--no-progress", "--layers", "1", "--dim", "32", "--heads", "2",
                    "--training-steps", "6", "--log-interval", "1", "--eval-interval", "100",
                    "--checkpoint-interval", "0", "--output-dir", str(tmp_path / "run")])
    assert len(dispatched) == 6 and sorted(ready) == list(range(6))
    ahead = [dispatched[i + 1] < ready[i] for i in range(5)]
    assert all(ahead), (ahead, [round(ready[i] - dispatched[i + 1], 3) for i in range(5)])
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == [1, 2, 3, 4, 5, 6]  # every step still logged
