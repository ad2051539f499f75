"""Run src/train.py with a fault injected: `python tests/faults.py FAULT -- src/train.py ARGS...`.

FAULT is
  step:N        SIGKILL this process after step N, once that step's checkpoints are written
  checkpoint:N  SIGKILL it in the middle of writing the checkpoint of step N: its weights and
                state files are written, its meta.json (the commit) not yet

The fault goes in through the trainer's hooks (`deit.trainer.Hooks`, passed to the script's
`main(argv, hooks)`); production code reads no fault setting.
"""

import importlib.util
import os
import signal
import sys
from pathlib import Path

from deit.trainer import Hooks


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hooks(fault: str) -> Hooks:
    kind, _, n = fault.partition(":")
    if kind not in ("step", "checkpoint") or not n.isdigit():
        raise SystemExit(f"unknown fault {fault!r}; allowed: step:N, checkpoint:N")
    at = int(n)
    if kind == "checkpoint":
        return Hooks(before_commit=lambda name, step: kill() if step == at else None)

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
