"""Faults with nothing lost: the disk filling up during a checkpoint write, SIGTERM to one of two
processes, a process that stops answering or never connects, and aim continuing one run across
a kill -9. Each through src/train.py (faults injected by tests/faults.py), each resume checked
bitwise against the uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from deit import checkpoint
from matrix import Case

ROOT = Path(__file__).resolve().parents[1]
TINY = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]

MATRIX = [
    Case("fault", "the disk fills up during a checkpoint write", "checkpoint 'last' of step 12 could not be written",
         "1", "nothing: no partial files, resume bit-exact"),
    Case("fault", "SIGTERM to one of two processes", "process 0: preempted / process 1: preempted, same step", "0",
         "nothing: the resumed 2-process run equals the uninterrupted one bitwise"),
    Case("fault", "one of two processes stops answering at a checkpoint",
         "process 0 waited host_timeout=20 s for process 1 at the loader-state exchange", "1", "nothing: checkpoints intact"),
    Case("fault", "process 1 starts, the coordinator (process 0) never does",
         "process 1 waited host_timeout=5 s for process 0, the coordinator", "1", "nothing written"),
    Case("fault", "process 0 starts, process 1 never does",
         "process 0 waited host_timeout=5 s for processes 1 to connect", "1", "nothing written"),
    Case("fault", "kill -9, then resume: the aim run", "the same aim run continues (same hash)", "0",
         "nothing: one series per metric, no duplicate steps"),
]
CASE = {c.what: c for c in MATRIX}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    subprocess.run([sys.executable, "-c", "from deit.data.prepare import ensure_digits; ensure_digits()"], cwd=ROOT,
                   check=True, env=env(1, path), capture_output=True)  # every process finds the digits ready
    return path


def env(devices: int, cache: Path) -> dict[str, str]:
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return {**os.environ, "XLA_FLAGS": flags, "DEIT_CACHE": str(cache)}


def train(cache: Path, *args: str, fault: str | None = None, devices: int = 1, **kw) -> subprocess.Popen:
    launcher = ["tests/faults.py", fault, "--"] if fault else []
    return subprocess.Popen([sys.executable, *launcher, "src/train.py", *args], cwd=ROOT, env=env(devices, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def state(out: Path, name: str = "last") -> dict[str, np.ndarray]:
    return load_file(str(out / "checkpoints" / name / checkpoint.STATE_FILE))


def assert_same_state(a: Path, b: Path) -> None:
    x, y = state(a), state(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].tobytes() == y[k].tobytes(), k


def train_steps(out: Path) -> list[int]:
    return [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(cache: Path, port: int, *args: str, faults=(None, None)) -> list[subprocess.Popen]:
    return [train(cache, *args, "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                  "--process-id", str(i), fault=faults[i], devices=2) for i in range(2)]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a filesystem that can fill up without touching the machine's disk)."""
    path = tmp_path / "disk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_disk_full_during_checkpoint_write_loses_nothing(cache, tmp_path, small_disk):
    case = CASE["the disk fills up during a checkpoint write"]
    common = [*TINY, "--training-steps", "24", "--log-interval", "4", "--eval-interval", "100",
              "--checkpoint-interval", "4"]
    ref = tmp_path / "ref"
    assert finish(train(cache, *common, "--output-dir", str(ref)))[0] == 0
    out, ballast = small_disk / "run", small_disk / "ballast"
    # After step 8's checkpoints are written the disk is filled (64 KiB left): step 12's fails.
    code, _, err = finish(train(cache, *common, "--output-dir", str(out), fault=f"fill:8:{ballast}"))
    assert code == int(case.exit), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and case.sees in last and "No space left on device" in last, err
    assert "Traceback" not in err
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial files
    assert checkpoint.read_meta(out / "checkpoints" / "last")["step"] == 8
    checkpoint.read_arrays(out / "checkpoints" / "last")  # intact: sizes and hashes verify

    ballast.unlink()  # room made: the same command resumes
    code, stdout, err = finish(train(cache, *common, "--output-dir", str(out)))
    assert code == 0, err
    assert "at step 8" in stdout
    assert_same_state(ref, out)
    assert train_steps(out) == [4, 8, 12, 16, 20, 24]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes(cache, tmp_path):
    """Both processes stop at one agreed step (JAX's preemption sync point: no per-step
    collective), save it, exit 0; resumed, the run equals the uninterrupted one bitwise."""
    common = [*TINY, "--fsdp", "2", "--training-steps", "16", "--log-interval", "1", "--eval-interval", "100"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    procs = two_processes(cache, free_port(), *common, "--output-dir", str(ref))
    for p in procs:
        code, _, err = finish(p)
        assert code == 0, err

    procs = two_processes(cache, free_port(), *common, "--output-dir", str(out))
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and len(train_steps(out)) >= 2):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "run ended before the signal"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    steps = []
    for i, (code, _, err) in enumerate(results):
        assert code == 0, err
        lines = [ln for ln in err.splitlines() if ln.startswith(f"process {i}: preempted")]
        assert len(lines) == 1, err
        steps.append(int(lines[0].split("at step ")[1].split()[0]))
    assert steps[0] == steps[1] < 16
    assert checkpoint.read_meta(out / "checkpoints" / "last")["step"] == steps[0]

    procs = two_processes(cache, free_port(), *common, "--output-dir", str(out))
    for p in procs:
        code, stdout, err = finish(p)
        assert code == 0, err
    assert_same_state(ref, out)
    assert train_steps(out) == list(range(1, 17))


@pytest.mark.slow
def test_a_process_that_stops_answering_is_named(cache, tmp_path):
    case = CASE["one of two processes stops answering at a checkpoint"]
    out = tmp_path / "run"
    args = [*TINY, "--training-steps", "8", "--log-interval", "4", "--eval-interval", "100", "--checkpoint-interval", "4",
            "--host-timeout", "20", "--output-dir", str(out)]
    procs = two_processes(cache, free_port(), *args, faults=(None, "stall:4"))
    start = time.time()
    code, _, err = finish(procs[0])
    procs[1].kill()
    finish(procs[1])
    assert code == int(case.exit), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and case.sees in last, err
    assert time.time() - start < 300
    assert not (out / "checkpoints" / "last").exists()  # the step-4 save never started; nothing partial


@pytest.mark.parametrize("who", [0, 1])
def test_a_process_that_never_connects_is_named(cache, tmp_path, who):
    case = CASE["process 1 starts, the coordinator (process 0) never does" if who == 1
                else "process 0 starts, process 1 never does"]
    out = tmp_path / "run"
    p = train(cache, *TINY, "--training-steps", "2", "--output-dir", str(out), "--host-timeout", "5",
              "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2", "--process-id", str(who),
              devices=2)
    code, _, err = finish(p, timeout=300)
    assert code == int(case.exit), err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and case.sees in last, err


@pytest.mark.slow
def test_aim_continues_the_killed_run(cache, tmp_path):
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    case = CASE["kill -9, then resume: the aim run"]
    root = tmp_path / "repo"
    out = root / "run"
    common = [*TINY, "--training-steps", "12", "--log-interval", "2", "--eval-interval", "6", "--checkpoint-interval", "4",
              "--output-dir", str(out)]
    code, _, err = finish(train(cache, *common, fault="step:10"))  # logged 2..10, checkpoint at 8
    assert code == -signal.SIGKILL, err
    killed = checkpoint.read_meta(out / "checkpoints" / "last")["aim_run"]
    code, stdout, err = finish(train(cache, *common))
    assert code == int(case.exit) and "at step 8" in stdout, err
    assert checkpoint.read_meta(out / "checkpoints" / "last")["aim_run"] == killed

    repo = aim.Repo(str(root))
    for h in repo.list_all_runs():
        RepoIndexManager.get_index_manager(repo).index(h)
    repo = aim.Repo(str(root))
    assert repo.list_all_runs() == [killed]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    series = set()
    for metric in repo.query_metrics("metric.name in ['loss', 'acc1']", report_mode=0).iter():
        steps, (values, *_) = metric.data.numpy()
        name = f"{metric.context.to_dict()['subset']}/{metric.name}"
        rows = [(e["step"], e[name]) for e in jsonl if name in e]
        assert list(steps) == [s for s, _ in rows], name  # each step once, in order
        np.testing.assert_allclose(values, [v for _, v in rows], rtol=1e-6)
        series.add(name)
    assert series == {k for e in jsonl for k in e if k.rpartition("/")[2] in ("loss", "acc1")}
