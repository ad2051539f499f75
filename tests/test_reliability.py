"""Nothing is lost: bit-exact resume after kill -9, SIGTERM saves, corrupt checkpoints fall back,
non-finite steps are skipped, bad config and bad data get clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from deit import checkpoint
from deit.data.prepare import digit_image, encode_png, write_shard
from matrix import Case

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import train as train_cli  # noqa: E402

TINY = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]

MATRIX = [
    Case("fault", "kill -9 after a step, during a checkpoint write, after another step", "resumed from ... at step N "
         "(the newest complete checkpoint)", "-9", "nothing: resume bit-exact, metrics.jsonl without duplicates"),
    Case("fault", "SIGTERM during training", "preempted: saved checkpoint at step N", "0",
         "nothing: saved at the step boundary"),
    Case("fault", "a second SIGINT", "exits at once", "130", "—"),
    Case("fault", "checkpoint file truncated or a byte flipped", "checkpoint file ... is corrupt; falling back", "0",
         "resumed from the checkpoint before it"),
    Case("fault", "non-finite losses (learning rate 1e30)", "3 consecutive steps with a non-finite loss", "1",
         "nothing: every checkpoint finite"),
    Case("sample", "5% corrupt samples (bad bytes, no label)", "counted in train/skipped_samples, val/skipped", "0",
         "the run completes"),
    Case("fault", "kill -9 three times in the quickstart run", "resumed from ...", "0",
         "nothing: still reaches the tiny-digits bar"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "XLA_FLAGS": "", "DEIT_CACHE": str(tmp_path_factory.mktemp("cache"))}


def run(env, *args, fault=None, timeout=600) -> subprocess.CompletedProcess:
    """src/train.py ARGS; with `fault` (step:N, checkpoint:N) through tests/faults.py, which injects it."""
    launcher = ["tests/faults.py", fault, "--"] if fault else []
    return subprocess.run([sys.executable, *launcher, "src/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def state_arrays(out: Path, name: str = "last") -> dict[str, np.ndarray]:
    return load_file(str(out / "checkpoints" / name / checkpoint.STATE_FILE))


def test_kill9_at_three_points_resumes_bitwise_exact(env, tmp_path):
    common = [*TINY, "--training-steps", "24", "--log-interval", "4", "--eval-interval", "12",
              "--checkpoint-interval", "4", "--droppath", "0.1"]
    ref = tmp_path / "ref"
    r = run(env, *common, "--output-dir", str(ref))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    # After step 7 (last checkpoint: 4); in the middle of writing checkpoint 12 (its state file
    # is written, meta.json not yet: 8 stays the newest complete); after step 18 (16 is newer).
    for fault, resumed in (("step:7", None), ("checkpoint:12", 4), ("step:18", 8)):
        r = run(env, *common, "--output-dir", str(out), fault=fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr)
        if resumed is not None:
            assert f"at step {resumed}" in r.stdout, (fault, r.stdout)
        if fault.startswith("checkpoint"):  # the interrupted write left a partial dir, never `last`
            assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
            assert checkpoint.read_meta(out / "checkpoints" / "last")["step"] == 8
    r = run(env, *common, "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "at step 16" in r.stdout

    a, b = state_arrays(ref), state_arrays(out)
    assert a.keys() == b.keys() and int(b[".step"]) == 24
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in e]
    assert steps == [4, 8, 12, 16, 20, 24]  # events past the resumed step were dropped, not duplicated
    ref_loss = [e["train/loss"] for e in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "train/loss" in e]
    out_loss = [e["train/loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in e]
    assert ref_loss == out_loss


def test_sigterm_saves_at_step_boundary_and_exits_0(env, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "src/train.py", *TINY, "--training-steps", "100000", "--log-interval", "2",
                          "--eval-interval", "100000", "--output-dir", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("preempted")]
    assert len(lines) == 1 and "saved checkpoint at step" in lines[0]
    step = int(lines[0].split("at step ")[1].split()[0])
    assert step >= 2 and checkpoint.read_meta(out / "checkpoints" / "last")["step"] == step
    assert int(state_arrays(out)[".step"]) == step


def test_second_signal_exits_at_once():
    code = ("import os, signal, time\nfrom deit.runtime import Preemption\np = Preemption()\n"
            "os.kill(os.getpid(), signal.SIGINT)\nassert p.requested\nprint('first handled', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\nprint('not reached')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 128 + signal.SIGINT and r.stdout == "first handled\n", r.stderr


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_previous(env, tmp_path, damage):
    out = tmp_path / "run"
    common = [*TINY, "--log-interval", "5", "--eval-interval", "100", "--checkpoint-interval", "5",
              "--output-dir", str(out)]
    assert run(env, *common, "--training-steps", "10").returncode == 0
    for name in ("last", "best"):  # both hold step 10; `prev` holds step 5
        bad = out / "checkpoints" / name / checkpoint.STATE_FILE
        blob = bytearray(bad.read_bytes())
        if damage == "truncate":
            blob = blob[: len(blob) // 2]
        else:
            blob[len(blob) // 2] ^= 0xFF
        bad.write_bytes(bytes(blob))
    bad = out / "checkpoints" / "last" / checkpoint.STATE_FILE
    with pytest.raises(ValueError, match=rf"{bad}.*(corrupt|unreadable)"):
        checkpoint.read_arrays(out / "checkpoints" / "last")
    r = run(env, *common, "--training-steps", "15")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint file {bad} is corrupt" in r.stderr
    assert "at step 5" in r.stdout  # prev, the checkpoint before the damaged one
    assert int(state_arrays(out)[".step"]) == 15


def test_non_finite_steps_stop_the_run_and_checkpoints_stay_finite(env, tmp_path):
    out = tmp_path / "run"
    # A huge learning rate blows the weights up within a few steps; every later step is non-finite.
    r = run(env, *TINY, "--learning-rate", "1e30", "--warmup-steps", "0", "--max-bad-steps", "3",
            "--training-steps", "60", "--log-interval", "1", "--eval-interval", "1000", "--checkpoint-interval", "1",
            "--output-dir", str(out))
    assert r.returncode == 1, r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("error: 3 consecutive steps with a non-finite loss") and "max_bad_steps=3" in msg
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["step"] < 60 and events[-1]["train/skipped_steps"] >= 1
    for path in checkpoint.candidates(out):
        for k, a in checkpoint.read_arrays(path).items():
            assert a.dtype.kind != "f" or np.isfinite(a).all(), (path, k)


BAD_CONFIGS = {
    "image_size": (["--image-size", "30"], "image_size=30 is not divisible by patch_size=8"),
    "heads": (["--dim", "30", "--heads", "4"], "dim=30 is not divisible by heads=4"),
    "batch": (["--train-batch-size", "60"], "train_batch_size=60 is not divisible by the device count 8"),
    "enum": (["--optimizer", "sgd"], "invalid choice 'sgd' for argument '--optimizer'"),
    "negative": (["--learning-rate", "-0.1"], "learning_rate=-0.1: must be >= 0.0"),
    "rate": (["--mixup", "-1"], "mixup=-1.0: must be >= 0.0"),
    "affine": (["--affine-degrees", "200"], "affine_degrees=200.0: must be in [0.0, 180.0]"),
    "shards": (["--train-dataset-shards", "/nonexistent/train-{0000..0003}.tar"], "matches no shards"),
    "student": (["--distillation-type", "hard"], "distillation_type='hard' needs a distilled student (--distilled)"),
    "teacher": (["--distillation-type", "hard", "--distilled", "--pooling", "cls"], "distillation_type='hard' needs --teacher-ckpt"),
    "teacher_file": (["--distillation-type", "hard", "--distilled", "--pooling", "cls", "--teacher-ckpt",
                      "/nonexistent/t.safetensors"],
                     "cannot load /nonexistent/t.safetensors: no such file"),
}
MATRIX += [Case("config", " ".join(args), expected) for args, expected in BAD_CONFIGS.values()]
MATRIX += [Case("config", "an unknown recipe name", "unknown recipe ...; allowed: ... one of 34 recipes")]


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    args, expected = BAD_CONFIGS[case]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # in-process: conftest gives 8 fake devices
        train_cli.main([*TINY, "--output-dir", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def test_unknown_recipe_and_unwritable_output_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["recipes:nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe 'recipes:nope'" in err[0]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        train_cli.main([*TINY, "--output-dir", str(blocker / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0] and str(blocker / "run") in err[0]


def test_five_percent_corrupt_data_trains_and_reports(env, tmp_path):
    """Real digits with every 20th sample corrupt (bad bytes, or no label): the run completes
    and counts them."""
    from sklearn.datasets import load_digits

    digits = load_digits()

    def sample(i):
        if i % 40 == 7:
            return f"{i:05d}", {"png": b"\x89PNG garbage", "cls": b"1"}
        files = {"png": encode_png(digit_image(digits.images[i]))}
        return f"{i:05d}", files if i % 40 == 27 else {**files, "cls": str(int(digits.target[i])).encode()}

    for s, sl in enumerate([range(0, 400), range(400, 800)]):
        write_shard(tmp_path / f"train-{s}.tar", map(sample, sl))
    write_shard(tmp_path / "valid-0.tar", map(sample, range(1400, 1600)))
    out = tmp_path / "run"
    r = run(env, *TINY, "--training-steps", "30", "--log-interval", "30", "--eval-interval", "30",
            "--train-dataset-shards", str(tmp_path / "train-{0..1}.tar"),
            "--valid-dataset-shards", str(tmp_path / "valid-0.tar"), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = next(e for e in events if "train/loss" in e)
    val = next(e for e in events if "val/acc1" in e)
    # 30 steps x 64 = 1920 samples = 2.4 passes over 800: >= 2 passes' worth of the 40 bad ones.
    assert train["train/skipped_samples"] >= 80
    assert val["val/skipped"] == 10 and val["val/num_samples"] == 190


@pytest.mark.slow
def test_soak_three_kills_still_reaches_the_bar(env, tmp_path):
    """The README quickstart's recipe killed (SIGKILL) three times and resumed each time still
    reaches the tiny-digits bar (>= 97.0% val top-1, 350 of 360: uninterrupted, seed pairs 1, 2 and 3
    reached 353 each on 2 cores of a Zen 5 EPYC, and 353 / 353 / 351 on one core; sklearn's SVM
    and 3-NN reach 96.4% and 96.7% on this split)."""
    out = tmp_path / "digits"
    cmd = [sys.executable, "src/train.py", "recipes:tiny-digits", "--no-progress", "--output-dir", str(out),
           "--checkpoint-interval", "100"]
    for kill_after in (400, 1000, 1700):  # steps reached (per metrics.jsonl) before the kill
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 900
        while True:
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if lines and json.loads(lines[-1])["step"] >= kill_after:
                break
            time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["step"] == 2400 and result["val/acc1"] >= 0.97, result
