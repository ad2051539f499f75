"""Classify images: `python src/predict.py --checkpoint PATH IMAGE... [--class-names FILE.json] [--top-k 5]`.

Prints one JSON line per image, in the order given:
`{"path": ..., "top_k": [{"index": i, "name": ..., "prob": p}, ...]}`, most probable first
(`name` is null without --class-names). Images are prepared as timm evaluates: the shorter side
resized bicubically to image_size / crop_ratio, then a center crop of image_size.
Bad input (a missing file, a directory, a file PIL cannot decode or a truncated one, bad
class-names JSON, an unloadable checkpoint) prints one line naming it on stderr and exits with
status 2, before anything is printed on stdout.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def read_class_names(path: str, labels: int) -> list[str | None]:
    """A JSON list of `labels` names, or a dict {index: name} (indices in [0, labels); others null)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read class names {path}: {type(e).__name__}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"class names {path}: invalid JSON ({e})") from None
    names: list[str | None] = [None] * labels
    if isinstance(obj, list):
        if len(obj) != labels:
            raise ValueError(f"class names {path}: a list of {len(obj)} names, the model has {labels} labels")
        items = list(enumerate(obj))
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            try:
                i = int(k)
            except ValueError:
                raise ValueError(f"class names {path}: key {k!r} is not an integer index") from None
            if not 0 <= i < labels:
                raise ValueError(f"class names {path}: index {i} is outside [0, {labels})")
            items.append((i, v))
    else:
        raise ValueError(f"class names {path}: expected a JSON list or an object {{index: name}}, "
                         f"got {type(obj).__name__}")
    for i, v in items:
        if not isinstance(v, str):
            raise ValueError(f"class names {path}: the name of class {i} is {v!r}, not a string")
        names[i] = v
    return names


def load_image(path: str, size: int, crop_ratio: float) -> np.ndarray:
    """uint8 [size, size, 3]: EXIF orientation applied, then timm's eval resize + center crop."""
    from deit.crop import eval_crop

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"cannot read image {path}: a directory, not an image file")
    if not p.is_file():  # missing, or a device / pipe (which would block or never end)
        raise ValueError(f"cannot read image {path}: {'not a regular file' if p.exists() else 'no such file'}")
    if p.stat().st_size == 0:
        raise ValueError(f"cannot read image {path}: an empty file")
    try:
        with Image.open(p) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except UnidentifiedImageError:  # its message repeats the path
        raise ValueError(f"cannot read image {path}: not in an image format PIL decodes "
                         f"(UnidentifiedImageError)") from None
    except Exception as e:  # PIL raises many kinds (OSError for a truncated file, SyntaxError...)
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return eval_crop(img, size, crop_ratio)


def default_crop_ratio(checkpoint: str) -> float:
    """The test_crop_ratio of a training checkpoint (its directory or the model.safetensors in
    it); otherwise timm's 0.875."""
    from deit import checkpoint as ckpt

    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    try:
        return float(ckpt.read_meta(folder)["config"]["augment"]["test_crop_ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.875


def top_k(probs: np.ndarray, k: int, names: list[str | None] | None) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "name": names[i] if names else None, "prob": float(probs[i])} for i in order]


def predict_files(checkpoint: str, images: list[str], *, class_names: str | None = None, k: int = 5,
                  crop_ratio: float | None = None, batch_size: int = 32) -> list[dict]:
    """The results `main` prints, one dict per image; ValueError naming the bad input."""
    import jax

    import deit

    if k < 1:
        raise ValueError(f"top_k={k}: must be >= 1")
    if crop_ratio is not None and not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio={crop_ratio}: must be in (0, 1]")
    model = deit.load_model(checkpoint)
    labels = model.cfg.labels
    if labels == 0:
        raise ValueError(f"{checkpoint}: the model has no classification head (labels=0)")
    names = read_class_names(class_names, labels) if class_names else None
    ratio = crop_ratio if crop_ratio is not None else default_crop_ratio(checkpoint)
    size = model.cfg.image_size
    arrays = [load_image(p, size, ratio) for p in images]  # every file checked before any output
    results = []
    for start in range(0, len(arrays), batch_size):
        batch = np.stack(arrays[start:start + batch_size])
        probs = np.asarray(jax.nn.softmax(deit.predict(model, batch).astype("float32"), axis=-1))
        for path, p in zip(images[start:start + batch_size], probs):
            results.append({"path": path, "top_k": top_k(p, min(k, labels), names)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL opens)")
    parser.add_argument("--checkpoint", required=True,
                        help="weights: a training checkpoint dir, our .safetensors, timm .pth/.safetensors, "
                             "deit3-jax .msgpack")
    parser.add_argument("--class-names", default=None,
                        help="JSON file: a list of names (one per label) or an object {index: name}")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--crop-ratio", type=float, default=None,
                        help="center-crop ratio; default: the checkpoint's test_crop_ratio, else 0.875")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        results = predict_files(args.checkpoint, args.images, class_names=args.class_names, k=args.top_k,
                                crop_ratio=args.crop_ratio, batch_size=args.batch_size)
    except ValueError as e:
        print(f"predict: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
