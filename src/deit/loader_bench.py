"""Host loader throughput: how many decoded, cropped images per second the input pipeline makes.

`benchmark_loader` times the real `train_batches` / `valid_batches` iterators (tar reading,
shuffle, PIL decode, crop, batching, worker processes) with nothing consuming on a device, so
the figure is the ceiling the host can feed. `photo_shards` writes ImageNet-like JPEG shards
for a benchmark when no dataset is at hand.
"""

import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deit import data
from deit.config import AugmentConfig, Config, DataConfig, ModelConfig


def loader_config(spec: str, *, image_size: int, batch_size: int, workers: int, random_crop: str,
                  augment_repeats: int, shuffle_buffer: int) -> Config:
    # labels=0: no head, so the loader skips the label range check (any dataset's labels pass).
    model = ModelConfig(layers=1, dim=8, heads=1, labels=0, patch_size=image_size, image_size=image_size)
    return Config(model=model,
                  data=DataConfig(train_dataset_shards=spec, valid_dataset_shards=spec, train_batch_size=batch_size,
                                  valid_batch_size=batch_size, train_loader_workers=workers,
                                  valid_loader_workers=workers, shuffle_buffer=shuffle_buffer),
                  augment=AugmentConfig(random_crop=random_crop, augment_repeats=augment_repeats))


def benchmark_loader(spec: str, *, split: str = "train", image_size: int = 224, batch_size: int = 64,
                     workers: int = 0, random_crop: str = "rrc", augment_repeats: int = 1, batches: int = 20,
                     warmup: int = 2, shuffle_buffer: int = 1000) -> dict[str, float | int | str]:
    """Images per second of the host loader over `batches` batches after `warmup` ones.

    `images_per_s_per_core` divides by the decoding processes (workers, or 1 for the main
    process); `distinct_images_per_s` counts decodes (a batch holds batch/augment_repeats).
    A valid split stops early at the end of its single pass.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r}: allowed 'train', 'valid'")
    cfg = loader_config(spec, image_size=image_size, batch_size=batch_size, workers=workers,
                        random_crop=random_crop, augment_repeats=augment_repeats, shuffle_buffer=shuffle_buffer)
    loader = data.train_batches(cfg) if split == "train" else data.valid_batches(cfg)
    try:
        for _ in range(warmup):
            next(loader)
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            try:
                next(loader)
            except StopIteration:
                break
            n += 1
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    if n == 0:
        raise ValueError(f"shard spec {spec!r} gave no {split} batches after {warmup} warmup batches")
    per_s = n * batch_size / seconds
    return {
        "split": split, "images_per_s": per_s, "images_per_s_per_core": per_s / max(1, workers),
        "distinct_images_per_s": per_s / (augment_repeats if split == "train" else 1),
        "workers": workers, "cpu_count": os.cpu_count() or 1, "batch_size": batch_size,
        "image_size": image_size, "random_crop": random_crop if split == "train" else "eval",
        "batches": n, "seconds": seconds, "skipped": loader.skipped,
    }


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field with some texture: JPEG-compresses and decodes like a
    photograph (pure noise would make unrealistically large, slow files)."""
    w, h = size
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def photo_shards(out_dir: str | os.PathLike, count: int = 512, *, size: tuple[int, int] = (500, 375),
                 shard_size: int = 256, quality: int = 90, seed: int = 0) -> str:
    """Write `count` JPEGs of `size` (ImageNet's typical 500x375) as shards; returns the spec."""
    rng = np.random.default_rng(seed)
    n_shards = -(-count // shard_size)
    for s in range(n_shards):
        def samples(lo: int = s * shard_size):
            for i in range(lo, min(count, lo + shard_size)):
                buf = io.BytesIO()
                photo(rng, size).save(buf, format="JPEG", quality=quality)
                yield f"{i:08d}", {"jpg": buf.getvalue(), "cls": str(i % 1000).encode()}
        data.write_shard(Path(out_dir) / f"photos-{s:04d}.tar", samples())
    return str(Path(out_dir) / f"photos-{{0000..{n_shards - 1:04d}}}.tar")

