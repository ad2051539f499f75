"""Evaluate a checkpoint: `python src/evaluate.py --checkpoint PATH --valid-dataset-shards SPEC`.

Prints one JSON object with `acc1`, `acc5`, `loss`, `num_samples` and `skipped`. Exact: the last
batch is padded and masked, so every sample of the shards counts once. The loss is the training
criterion of the checkpoint's config (BCE for bce recipes, as deit3-jax), else softmax CE.
"""

import dataclasses
import json
import sys
from typing import Annotated

import tyro

from deit import hostmem
from deit.config import cli_or_exit


@dataclasses.dataclass(frozen=True)
class Args:
    checkpoint: str
    """Weights: a training checkpoint dir, our .safetensors, timm .pth/.safetensors or deit3-jax .msgpack."""
    valid_dataset_shards: str = "digits:valid"
    valid_batch_size: int = 256
    valid_loader_workers: int = 0
    test_crop_ratio: float | None = None
    """Center-crop ratio; default: the checkpoint's training config, else 0.875."""
    image_size: int | None = None
    """Evaluation resolution; default: the model's."""
    progress: Annotated[bool, tyro.conf.arg(help="Show a progress bar on stderr.")] = True


def run(args: Args) -> dict:
    import jax

    from deit import checkpoint, sharding
    from deit.config import Config, check_divisible, from_dict
    from deit.data import loader
    from deit.interop import load_model
    from deit.evaluation import evaluate

    model = load_model(args.checkpoint)  # any bad weights file: a one-line ValueError naming it
    cfg = Config(model=model.cfg)
    try:
        meta = checkpoint.read_meta(args.checkpoint)
    except (FileNotFoundError, NotADirectoryError):  # a weights file, not a training checkpoint
        meta = {}
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{args.checkpoint}/meta.json is not valid JSON ({e}); allowed: the meta.json its "
                         f"checkpoint wrote") from None
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        try:
            cfg = from_dict(meta["config"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{args.checkpoint}/meta.json: its config is not valid ({e})") from None
    else:
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, test_crop_ratio=0.875))
    if args.image_size not in (None, model.cfg.image_size) and model.cfg.posemb != "sincos2d":
        raise ValueError(f"image_size={args.image_size}: this model's learnable position embedding is for "
                         f"{model.cfg.image_size} (a sincos2d model evaluates at any size)")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(model.cfg, image_size=args.image_size or model.cfg.image_size),
        data=dataclasses.replace(cfg.data, valid_dataset_shards=args.valid_dataset_shards,
                                 valid_batch_size=args.valid_batch_size, valid_loader_workers=args.valid_loader_workers),
        augment=dataclasses.replace(cfg.augment, test_crop_ratio=args.test_crop_ratio or cfg.augment.test_crop_ratio))
    mesh = sharding.make_mesh(1)
    check_divisible("valid_batch_size", args.valid_batch_size, mesh.size, f"the device count {mesh.size}")
    batches = loader.valid_batches(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    try:
        result = evaluate(model, batches, mesh, progress=args.progress, criterion=cfg.loss.criterion)
    finally:
        batches.close()
    return result


def main(argv: list[str] | None = None) -> None:
    args = cli_or_exit(lambda: tyro.cli(Args, args=argv, description=__doc__))
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    hostmem.retain_freed_memory()  # before JAX starts its backend: deit/hostmem.py says why
    main()
