"""Train a ViT: `python src/train.py recipes:NAME [--flag value ...]`.

Every recipe in `recipes/` is a subcommand; flags override its fields (deit3-jax's names).
`--dry-run` prints the resolved config, parameter count and forward FLOPs as JSON and exits.
With `--memory-report N` it adds XLA's per-device memory and compile time of the train step
on N fake CPU devices, with `--memory-report-tpu TOPOLOGY` the TPU compiler's for a TPU slice
(`deit.memory`). `main(argv, hooks)` runs in-process; `hooks`
(a `deit.trainer.Hooks`) is how the tests inject faults (`tests/faults.py`).
"""

import json
import os
import sys
import typing

import tyro

from deit import hostmem
from deit import recipes
from deit.config import Config, cli_or_exit
from deit.model import count_params, forward_flops


def parse(argv: list[str] | None = None) -> Config:
    names = recipes.names()
    choices = tuple(
        typing.Annotated[Config, tyro.conf.subcommand(name=f"recipes:{n}", default=recipes.load(n),
                                                      description=recipes.describe(n))]
        for n in names
    )
    return tyro.cli(typing.Union[choices], args=argv, description=__doc__,
                    config=(tyro.conf.OmitSubcommandPrefixes,))


def parse_or_exit(argv: list[str] | None) -> Config:
    """Parse the command line; any bad input exits 2 with one line on stderr."""
    args = sys.argv[1:] if argv is None else argv
    names = recipes.names()
    first = next((a for a in args if not a.startswith("-")), None)
    helping = "--help" in args or "-h" in args
    if first is None and not helping:
        print("error: no recipe given; usage: python src/train.py recipes:NAME [--flag value ...] "
              "(e.g. recipes:tiny-digits; all in --help)", file=sys.stderr)
        sys.exit(2)
    if first is not None and not (first.startswith("recipes:") and first[len("recipes:"):] in names) and not helping:
        print(f"error: unknown recipe {first!r}; allowed: recipes:NAME with NAME one of {len(names)} recipes "
              f"(e.g. recipes:tiny-digits; all in --help)", file=sys.stderr)
        sys.exit(2)
    return cli_or_exit(lambda: parse(args))


def exit_now(message: str) -> None:
    """`error: message`, then exit 1 at once: no exit-time cleanup (jax's shutdown barrier waits
    for processes that are gone; aim's cleanup, for a disk that is full)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def main(argv: list[str] | None = None, hooks=None) -> None:
    cfg = parse_or_exit(argv)
    if cfg.dry_run:
        info = {"config": cfg.to_dict(), "params": count_params(cfg.model), "flops": forward_flops(cfg.model)}
        # compiled in a subprocess: its fake device count (or libtpu's setup) is fixed before JAX starts
        reports = {"memory": cfg.memory_report or None, "memory_tpu": cfg.memory_report_tpu}
        for key, target in reports.items():
            if not target:
                continue
            from deit.memory import report_subprocess

            try:
                info[key] = report_subprocess(cfg, target)
            except (ValueError, RuntimeError) as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2 if isinstance(e, ValueError) else 1)
        print(json.dumps(info))
        return
    from deit.checkpoint import WriteError
    from deit.runtime import HostTimeout
    from deit.trainer import train  # heavy imports only when training

    try:
        train(cfg, hooks)
    except HostTimeout as e:  # another process is gone: exit now, not at jax's shutdown barrier
        exit_now(str(e))
    except ValueError as e:  # bad config or data found before training: nothing was written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (WriteError, OSError) as e:  # e.g. a full disk; checkpoints are atomic, earlier ones intact
        msg = str(e)
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            msg = (f"{e.strerror or e}{where}; the checkpoints written before it are intact (fix it, then run the "
                   "same command again to resume)")
        exit_now(msg)  # not sys.exit: aim's exit-time cleanup would wait forever on a full disk
    except RuntimeError as e:  # a run that cannot go on (e.g. non-finite losses); checkpoints intact
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    hostmem.retain_freed_memory()  # before JAX starts its backend: deit/hostmem.py says why
    main()
