"""Every one of the 33 deit3-jax recipes trains, through `src/train.py`'s parser and the real
trainer, with its own repeats, augmentation policy, erasing, mixup/cutmix, criterion, optimiser,
clipping, layer decay, grad accumulation and label mapping. Only the model (2 blocks, dim 32,
patch 8), the image size and the data (digits) are scaled down; batches keep what the recipe's
batch exercises on this test's 8 fake devices (its remainder modulo the repeats, divisibility by
devices x grad_accum). Each fine-tuning recipe starts from its own pre-training run, found under
`$GCS_MODEL_DIR` by the recipe's own `pretrained_ckpt` name, at another image size."""

import json
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))

import deit  # noqa: E402
import train as train_cli  # noqa: E402  (src/train.py)
from deit import recipes  # noqa: E402
from deit.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow

PT_SIZE, FT_SIZE = 16, 24  # pre-training and fine-tuning sizes: the position grid goes 2x2 -> 3x3
FILES = sorted(p.stem for p in recipes.RECIPES_DIR.glob("*.json") if not p.stem.startswith("_") and p.stem != "tiny-digits")
FT = [n for n in FILES if "-ft-" in n]
STANDALONE = [n for n in FILES if "-ft-" not in n and not any(f.startswith(n + "-ft-") for f in FT)]


def small_batch(recipe_batch: int, repeats: int, accum: int, devices: int) -> int:
    """The smallest batch >= 16 with the recipe batch's remainder modulo the repeats that the
    devices x grad_accum divide."""
    step = devices * accum
    b = step * max(1, -(-16 // step))
    while b % repeats != recipe_batch % repeats:
        b += step
    return b


def run(name: str, out, size: int, model_dir) -> list[dict]:
    flags = recipes.flags(name)
    batch = small_batch(flags["train_batch_size"], flags["augment_repeats"], flags["grad_accum"], jax.device_count())
    args = [f"recipes:{name}", "--layers", "2", "--dim", "32", "--heads", "2", "--patch-size", "8",
            "--image-size", str(size), "--train-dataset-shards", "digits:train", "--train-batch-size", str(batch),
            "--valid-batch-size", "64", "--train-loader-workers", "0", "--valid-loader-workers", "0",
            "--training-steps", "2", "--warmup-steps", "1", "--log-interval", "1", "--no-progress",
            "--output-dir", str(out)]
    if flags.get("valid_dataset_shards") is not None:
        args += ["--valid-dataset-shards", "digits:valid"]
    cfg = train_cli.parse_or_exit(args)
    # What the recipe exercises survives the scaling.
    for key in ("augment_repeats", "auto_augment", "random_erasing", "mixup", "cutmix", "criterion", "optimizer",
                "clip_grad", "lr_decay", "grad_accum", "label_mapping", "layerscale", "labels", "droppath"):
        section = next(v for v in cfg.to_dict().values() if isinstance(v, dict) and key in v)
        assert section[key] == flags.get(key), (name, key)
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(name: str, out, events: list[dict]) -> None:
    flags = recipes.flags(name)
    train_events = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train_events] == [1, 2], name
    assert all(np.isfinite(e["train/loss"]) and e["train/skipped_steps"] == 0 for e in train_events), name
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    if flags.get("valid_dataset_shards") is None:  # deit3-jax: no validation, `last` only
        assert not any(k.startswith("val") for e in events for k in e), name
        assert saved == ["last"], (name, saved)
    else:
        val = [e for e in events if "val/acc1" in e]
        assert len(val) == 1 and val[0]["val/num_samples"] == 360, name
        assert saved == ["best", "last"], (name, saved)


@pytest.mark.parametrize("name", STANDALONE)
def test_recipe_trains(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / name
    check_run(name, out, run(name, out, PT_SIZE, tmp_path))


@pytest.mark.parametrize("name", FT)
def test_pretrain_then_finetune(name, tmp_path, monkeypatch):
    """The -ft recipe finds its pre-training run's weights by its own `pretrained_ckpt` name
    ($GCS_MODEL_DIR/<pt>-last.msgpack -> <pt>/checkpoints/last), with no flag edited."""
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GCS_MODEL_DIR", str(tmp_path))
    pt = name.split("-ft-")[0]
    assert recipes.flags(name)["pretrained_ckpt"] == f"$GCS_MODEL_DIR/{pt}-last.msgpack"
    check_run(pt, tmp_path / pt, run(pt, tmp_path / pt, PT_SIZE, tmp_path))
    pre = deit.load_model(tmp_path / pt / "checkpoints" / "last")
    out = tmp_path / name
    check_run(name, out, run(name, out, FT_SIZE, tmp_path))
    ft = deit.load_model(out / "checkpoints" / "last")
    assert pre.cfg.image_size == PT_SIZE and ft.cfg.image_size == FT_SIZE
    assert pre.pos_embed.shape == (4, 32) and ft.pos_embed.shape == (9, 32)
    # Blocks started from the pre-trained ones (2 small updates since), not from a fresh init.
    w0, w1 = np.asarray(pre.blocks.mlp.fc1.weight), np.asarray(ft.blocks.mlp.fc1.weight)
    assert np.abs(w1 - w0).max() < 0.1 * np.abs(w0).max()
    if recipes.flags(name).get("label_mapping"):  # in21k -> in1k: mapped rows copied, the rest bias -10
        mapping = json.loads((recipes.RECIPES_DIR / "label_maps" / "in21k_to_in1k.json").read_text())
        assert pre.cfg.labels == 19167 and ft.cfg.labels == 1000
        unmapped = sorted(set(range(1000)) - set(mapping["dst"]))
        if unmapped:
            assert np.asarray(ft.head.bias)[unmapped[0]] < -9


def test_every_recipe_is_covered():
    assert len(FILES) == 33
    covered = set(STANDALONE) | set(FT) | {n.split("-ft-")[0] for n in FT}
    assert covered == set(FILES)
