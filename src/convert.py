"""Convert ViT weights between formats.

    python src/convert.py IN OUT [--layout deit3|vit] [--ema]

A training checkpoint (`<output-dir>/checkpoints/best`) exports to a params-only file for
sharing this way; `--ema` exports its EMA weights instead.

IN: anything `deit.load_model` reads (checkpoint directory, .safetensors, .pth/.pt/.bin,
deit3-jax .msgpack). OUT by extension: .safetensors (ours: timm naming + config metadata)
or .pth/.pt (a timm state dict of tensors). Errors print one line and exit with status 2,
leaving no output file behind.
"""

import argparse
import sys
from pathlib import Path

from deit import fileio
from deit.fileio import atomic_path
from deit.interop import load_model, save_model
from deit.timm_weights import to_timm

WRITABLE = (".safetensors", ".pth", ".pt")


def save_torch(model, path: Path, layout: str) -> None:
    try:
        import torch
    except ImportError:
        raise ValueError("writing .pth needs torch (pip install torch)") from None
    state = {k: torch.from_numpy(v) for k, v in to_timm(model, layout).items()}
    with atomic_path(path) as tmp:  # never a half-written file under the final name
        torch.save(state, tmp)


def convert(src: str, dst: str, layout: str = "deit3", heads: int | None = None,
            image_size: int | None = None, ema: bool = False) -> None:
    out = Path(dst)
    if out.suffix.lower() not in WRITABLE:
        raise ValueError(f"cannot write {out}: unknown extension; allowed: {', '.join(WRITABLE)}")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: no such directory {out.parent}")
    if why := fileio.unwritable(out.parent):
        raise ValueError(f"cannot write {out}: {out.parent}: {why}; allowed: a path in a directory this user can write")
    if ema:
        from deit.checkpoint import load_ema

        if not Path(src).is_dir():
            raise ValueError(f"--ema needs a training checkpoint directory, got {src}")
        model = load_ema(src)
    else:
        model = load_model(src, heads=heads, image_size=image_size)
    if out.suffix.lower() == ".safetensors":
        save_model(model, out, layout=layout)
    else:
        save_torch(model, out, layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="input weights (directory, .safetensors, .pth/.pt/.bin, .msgpack)")
    parser.add_argument("dst", help="output weights (.safetensors or .pth/.pt)")
    parser.add_argument("--layout", choices=("deit3", "vit"), default="deit3",
                        help="timm position layout: deit3 (patches only) or vit (with zero cls/dist rows)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads, for timm files of non-standard width")
    parser.add_argument("--image-size", type=int, default=None, help="image size of a sincos2d deit3-jax checkpoint")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights of a training checkpoint (trained with --model-ema)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.layout, args.heads, args.image_size, args.ema)
    except (ValueError, OSError) as e:
        print(f"convert: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
