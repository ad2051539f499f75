"""Dataset preparation: samples -> webdataset shards (png/jpg + cls, timm's imagenet-1k-wds layout).

sklearn's digits (the bundled tiny dataset, also prepared on demand into a cache for the
`digits:train` / `digits:valid` specs) and ImageFolder trees (SRC/<class>/<image>).
"""

import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from jaxtyping import Float, UInt8
from PIL import Image
from tqdm import tqdm

from deit.data.shards import IMAGE_EXTS
from deit.fileio import atomic_path, write_text

DIGITS_SPLITS = {"train": slice(0, 1437), "valid": slice(1437, 1797)}
DIGITS_FORMAT = 2  # bump when the encoding of the digits shards changes: old caches are not reused


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `(key, {ext: bytes})` samples as one tar shard, atomically; returns the count.

    Fixed mtime/owner so the same samples give byte-identical shards.
    """
    n = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def encode_png(img: UInt8[np.ndarray, "h w 3"]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- digits

def digit_image(pixels: Float[np.ndarray, "8 8"]) -> UInt8[np.ndarray, "32 32 3"]:
    """One load_digits image (values 0..16) as 32x32 RGB uint8, upscaled bicubically.

    Bicubic rather than nearest: with 4x4-pixel patches a nearest upscale makes every patch
    token a single flat grey level, and a ViT learned several times slower from such tokens
    on this data (59% vs 22% val top-1 after 300 steps in our runs); smooth strokes give
    each patch local shape, as real photos do.
    """
    gray = np.round(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC))
    return np.repeat(big[:, :, None], 3, axis=2)


def prepare_digits(out_dir: str | os.PathLike, shard_size: int = 256) -> tuple[str, str]:
    """Write sklearn's digits as webdataset shards (png + cls); returns (train_spec, valid_spec).

    The first 1437 images (load_digits order) are train, the last 360 valid; several shards
    per split so multi-process sharding has something to split.
    """
    from sklearn.datasets import load_digits

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    digits = load_digits()
    specs = []
    for split, sl in DIGITS_SPLITS.items():
        idx = np.arange(len(digits.images))[sl]
        n_shards = math.ceil(len(idx) / shard_size)
        for s in range(n_shards):
            part = idx[s * shard_size:(s + 1) * shard_size]
            write_shard(Path(out_dir) / f"digits-{split}-{s:04d}.tar",
                        ((f"{i:05d}", {"png": encode_png(digit_image(digits.images[i])),
                                       "cls": str(int(digits.target[i])).encode()}) for i in part))
        specs.append(str(Path(out_dir) / f"digits-{split}-{{0000..{n_shards - 1:04d}}}.tar"))
    return specs[0], specs[1]


def cache_root() -> Path:
    """`$DEIT_CACHE`, else ~/.cache/deit."""
    return Path(os.environ.get("DEIT_CACHE") or Path.home() / ".cache" / "deit")


def ensure_digits() -> Path:
    """The digits shard folder in the cache, prepared once; safe when processes race.

    Each process prepares into its own temp folder and renames it into place; a loser of the
    race (rename onto a non-empty folder fails) drops its copy.
    """
    final = cache_root() / f"digits-v{DIGITS_FORMAT}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".digits-"))
    try:
        prepare_digits(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- ImageFolder

def folder_classes(src: Path) -> list[str]:
    """ImageFolder classes: the sorted subfolder names (torchvision's class order)."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(src)!r} has no class subfolders; expected SRC/<class>/<image>")
    return classes


def folder_files(src: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    """(image path, label) for every image file under SRC/<class>/ (any depth), sorted."""
    files = []
    for name in folder_classes(src):
        if name not in class_to_idx:
            raise ValueError(f"class folder {name!r} is not in the class index; known: {len(class_to_idx)} classes")
        files += [(p, class_to_idx[name]) for p in sorted((src / name).rglob("*"))
                  if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    return files


def prepare_folder(src: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str | None = None,
                   shard_size: int = 1000, seed: int = 0, classes: str | os.PathLike | None = None,
                   progress: bool = True) -> tuple[str, dict[str, int]]:
    """ImageFolder tree (SRC/<class>/<image>) -> shuffled webdataset shards; returns (spec, class_to_idx).

    The image bytes are stored as they are (no re-encode); keys are running numbers and a
    `json` member keeps the source path. Files are shuffled (seeded) before sharding, since
    a class-sorted shard would defeat the loader's shard + buffer shuffle. The class index
    is written to OUT/<prefix>-classes.json; pass `classes` (e.g. train's JSON) to give a
    validation folder the same label numbers.
    """
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise ValueError(f"image folder {str(src)!r} does not exist")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    prefix = prefix or src.name
    class_to_idx = (json.loads(Path(classes).read_text()) if classes is not None
                    else {c: i for i, c in enumerate(folder_classes(src))})
    files = folder_files(src, class_to_idx)
    if not files:
        raise ValueError(f"image folder {str(src)!r} has no images with extensions {IMAGE_EXTS}")
    order = np.random.default_rng(seed).permutation(len(files))
    n_shards = math.ceil(len(files) / shard_size)
    bar = tqdm(total=len(files), desc=f"{prefix} shards", unit="img", disable=not progress)

    def samples(part: np.ndarray) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in part:
            path, label = files[i]
            ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            meta = json.dumps({"path": str(path.relative_to(src)), "label": label}).encode()
            yield f"{i:08d}", {ext: path.read_bytes(), "cls": str(label).encode(), "json": meta}
            bar.update()

    for s in range(n_shards):
        write_shard(out / f"{prefix}-{s:04d}.tar", samples(order[s * shard_size:(s + 1) * shard_size]))
    bar.close()
    write_text(out / f"{prefix}-classes.json", json.dumps(class_to_idx, indent=1))
    return str(out / f"{prefix}-{{0000..{n_shards - 1:04d}}}.tar"), class_to_idx
