"""Train a ViT: `python src/train.py recipes:NAME [--flag value ...]`.

Every recipe in `recipes/` is a subcommand; flags override its fields (deit3-jax's names).
`--dry-run` prints the resolved config, parameter count and forward FLOPs as JSON and exits.
"""

import json
import sys
import typing

import tyro

from deit import recipes
from deit.config import Config
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


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse(argv)
    except ValueError as e:  # config validation (e.g. image_size not divisible by patch_size)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.dry_run:
        print(json.dumps({"config": cfg.to_dict(), "params": count_params(cfg.model), "flops": forward_flops(cfg.model)}))
        return
    from deit.trainer import train  # heavy imports only when training

    try:
        train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
