"""Run src/train.py with a fault injected: `python tests/faults.py FAULT -- src/train.py ARGS...`.

FAULT is
  step:N        SIGKILL this process after step N, once that step's checkpoints are written
  checkpoint:N  SIGKILL it in the middle of writing the checkpoint of step N: its weights and
                state files are written, its meta.json (the commit) not yet
  fill:N:PATH   after step N (its checkpoints written), fill the filesystem holding PATH with
                the file PATH, leaving 64 KiB free: the next checkpoint write runs out of space
  stall:N       at the save of step N, before it gathers anything, sleep for an hour (a process
                that stops answering)

The fault goes in through the trainer's hooks (`deit.trainer.Hooks`, passed to the script's
`main(argv, hooks)`); production code reads no fault setting.
"""

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

from deit.trainer import Hooks


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fill(path: str) -> None:
    """Write `path` until its filesystem has 64 KiB left."""
    stat = os.statvfs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.truncate(0)
        left = stat.f_bavail * stat.f_frsize - (64 << 10)
        while left > 0:
            n = min(left, 1 << 20)
            f.write(b"\0" * n)
            left -= n


def hooks(fault: str) -> Hooks:
    kind, _, rest = fault.partition(":")
    n, _, path = rest.partition(":")
    if kind not in ("step", "checkpoint", "fill", "stall") or not n.isdigit() or (kind == "fill") != bool(path):
        raise SystemExit(f"unknown fault {fault!r}; allowed: step:N, checkpoint:N, fill:N:PATH, stall:N")
    at = int(n)
    if kind == "checkpoint":
        return Hooks(before_commit=lambda name, step: kill() if step == at else None)
    if kind == "stall":
        return Hooks(before_save=lambda step: time.sleep(3600) if step == at else None)
    if kind == "fill":
        def after_step(step, writer):
            if step == at:
                writer.wait()
                fill(path)

        return Hooks(after_step=after_step)

    def after_step(step, writer):
        if step == at:
            writer.wait()  # a clean kill point: the step's checkpoints are complete
            kill()

    return Hooks(after_step=after_step)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    fault, _, script, *args = argv
    path = Path(script).resolve()
    sys.path.insert(0, str(path.parent))  # as when the script runs itself
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args, hooks=hooks(fault))


if __name__ == "__main__":
    main(sys.argv[1:])
