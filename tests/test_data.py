import collections
import dataclasses
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from deit.config import AugmentConfig, Config, DataConfig, ModelConfig
from deit.data.decode import decode_image
from deit.data.kept import Kept
from deit.data.loader import resolve_shards, skip_state, train_batches, valid_batches
from deit.data.order import epoch_stream
from deit.data.prepare import (DIGITS_FORMAT, digit_image, encode_png, ensure_digits, prepare_digits,
                               prepare_folder, write_shard)
from deit.data.shards import count_samples, expand_shards, iter_shard, shard_records

DIGITS = load_digits()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    return prepare_digits(tmp_path_factory.mktemp("digits"))


def config(train: str, valid: str = "", **kw) -> Config:
    """Digits-sized config; kw go to the data or augment section by field name."""
    d = {f.name for f in dataclasses.fields(DataConfig)}
    return Config(
        model=ModelConfig(layers=1, dim=32, heads=2, labels=10, patch_size=4, image_size=32),
        data=DataConfig(train_dataset_shards=train, valid_dataset_shards=valid or train, train_batch_size=32,
                        valid_batch_size=64, **{k: v for k, v in kw.items() if k in d}),
        augment=AugmentConfig(**{k: v for k, v in kw.items() if k not in d}),
    )


def take(loader, n: int) -> list:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def keys_of(urls, *args) -> list[tuple[int, int]]:
    return [(r.shard, r.pos) for r in epoch_stream(urls, *args)]


def digest(img: np.ndarray) -> bytes:
    return np.ascontiguousarray(img).tobytes()


def test_prepare_digits(shards):
    train, valid = (expand_shards(s) for s in shards)
    assert sum(map(count_samples, train)) == 1437 and sum(map(count_samples, valid)) == 360
    recs = list(shard_records(train, range(len(train)), 10))
    assert [r.label for r in recs] == DIGITS.target[:1437].tolist()
    first = np.asarray(Image.open(io.BytesIO(recs[0].image)))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, digit_image(DIGITS.images[0]))
    gray = np.round(DIGITS.images[0] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(first, np.repeat(expected[:, :, None], 3, axis=2))
    vrecs = list(shard_records(valid, range(len(valid)), 10))
    assert [r.label for r in vrecs] == DIGITS.target[1437:].tolist()


def test_expand_shards(shards, tmp_path):
    train = expand_shards(shards[0])
    assert len(train) == 6 and train[0].endswith("digits-train-0000.tar")
    assert expand_shards(train[0].replace("0000", "*")) == train
    assert expand_shards("gs://b/x-{00..02}.tar") == ["gs://b/x-00.tar", "gs://b/x-01.tar", "gs://b/x-02.tar"]
    assert expand_shards("pipe:curl -s https://h/a-{0..1}.tar") == [
        "pipe:curl -s https://h/a-0.tar", "pipe:curl -s https://h/a-1.tar"]
    with pytest.raises(ValueError, match="nothing-here"):
        expand_shards(str(tmp_path / "nothing-here-{0..3}.tar"))
    with pytest.raises(ValueError, match="digits:test"):
        resolve_shards("digits:test")


def test_digits_spec_prepares_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path))
    threads = [threading.Thread(target=ensure_digits) for _ in range(2)]  # racing preparers
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    urls = resolve_shards("digits:valid")
    assert [u.rsplit("/", 1)[1] for u in urls] == ["digits-valid-0000.tar", "digits-valid-0001.tar"]
    assert all(u.startswith(str(tmp_path / "digits")) for u in urls)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"digits-v{DIGITS_FORMAT}"]  # no temp folders left


def test_train_batches_shapes_and_determinism(shards):
    cfg = config(shards[0], random_crop="rrc")
    a, b = take(train_batches(cfg), 3), take(train_batches(cfg), 3)
    for (x, y), (x2, y2) in zip(a, b):
        assert x.shape == (32, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (32,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < 10
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    other = take(train_batches(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle_seed=2))), 1)
    assert not np.array_equal(a[0][0], other[0][0])


def test_epoch_order_depends_on_epoch(shards):
    urls = expand_shards(shards[0])
    e0, e1 = keys_of(urls, 1, 0, 500, 10, 0, 1), keys_of(urls, 1, 1, 500, 10, 0, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1) and len(set(e0)) == 1437
    assert keys_of(urls, 1, 0, 500, 10, 0, 1) == e0


@pytest.mark.parametrize("mode", ["none", "rrc"])
def test_repeats(shards, mode):
    cfg = config(shards[0], random_crop=mode, augment_repeats=4)
    (x, y), = take(train_batches(cfg), 1)
    # k divides the batch: deit3-jax's b[i::k] order puts copy c of sample j at c * 8 + j
    x, y = x.reshape(4, 8, 32, 32, 3), y.reshape(4, 8)
    assert (y == y[0]).all()
    same = [np.array_equal(x[c, j], x[0, j]) for c in range(1, 4) for j in range(8)]
    assert all(same) if mode == "none" else not any(same)
    assert len({digest(x[0, j]) for j in range(8)}) == 8  # 8 distinct samples
    # 3 does not divide 32: copies straddle batches (tests/test_repeats.py checks the layout)
    (x, y), = take(train_batches(config(shards[0], random_crop=mode, augment_repeats=3)), 1)
    assert x.shape == (32, 32, 32, 3) and y.shape == (32,)


@pytest.mark.parametrize("n_shards", [6, 1])
def test_processes_read_disjoint_samples(shards, n_shards):
    urls = expand_shards(shards[0])[:n_shards]  # 1 shard < 2 processes: split by sample
    p0, p1 = keys_of(urls, 1, 0, 100, 10, 0, 2), keys_of(urls, 1, 0, 100, 10, 1, 2)
    assert not set(p0) & set(p1)
    assert len(set(p0) | set(p1)) == len(p0) + len(p1) == (256 if n_shards == 1 else 1437)
    x, y = take(train_batches(config(shards[0]), process_index=1, process_count=2), 1)[0]
    assert x.shape == (16, 32, 32, 3) and y.shape == (16,)


@pytest.mark.parametrize("spec,count", [(None, 1), (None, 2), ("one", 2), (None, 3)])
def test_valid_batches_each_sample_once(shards, spec, count):
    valid = shards[1] if spec is None else expand_shards(shards[1])[0]
    cfg = config(valid, test_crop_ratio=1.0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, valid_batch_size=48 * count))
    seen, n_batches = collections.Counter(), set()
    for p in range(count):
        batches = list(valid_batches(cfg, process_index=p, process_count=count))
        n_batches.add(len(batches))
        for x, y, m in batches:
            assert x.shape == (48, 32, 32, 3) and y.dtype == np.int32 and m.dtype == bool
            seen.update((digest(img), int(label)) for img, label in zip(x[m], y[m]))
    expected = range(1437, 1797) if spec is None else range(1437, 1437 + 256)
    assert len(n_batches) == 1
    assert seen == collections.Counter((digest(digit_image(DIGITS.images[i])), int(DIGITS.target[i]))
                                       for i in expected)


def write_samples(path, samples) -> str:
    write_shard(path, samples)
    return str(path)


def png_sample(i: int, label: bytes | None) -> dict[str, bytes]:
    files = {"png": encode_png(digit_image(DIGITS.images[i]))}
    return files if label is None else {**files, "cls": label}


def test_kept_holds_within_its_budget_and_a_replaced_entry_frees_its_bytes():
    kept = Kept(budget_bytes=10)
    assert kept.put("a", 1, 6) and not kept.put("b", 2, 5) and kept.get("b") is None  # 11 > 10
    assert kept.put("a", 3, 2) and kept.nbytes == 2 and kept.get("a") == 3  # replaced, not added
    assert kept.put("b", 2, 8) and kept.nbytes == 10 and list(kept) == ["a", "b"]
    assert not kept.put("a", 4, 3) and "a" not in kept and kept.nbytes == 8  # the old value is gone too


def test_a_small_shard_is_parsed_once_until_it_is_rewritten(tmp_path, monkeypatch):
    """Small local shards are kept after one complete read (tiny-digits: the loader's CPU time per
    batch 13 -> 7 ms); a rewritten shard is read again and replaces its entry; one read partly or
    ending early is not kept."""
    import deit.data.shards as shards_module

    parsed = []
    real = shards_module.tar_file_iterator
    monkeypatch.setattr(shards_module, "tar_file_iterator", lambda stream: (parsed.append(1), real(stream))[1])
    url = write_samples(tmp_path / "a.tar", [(f"k{i}", png_sample(i, b"%d" % i)) for i in range(3)])
    next(iter_shard(url))  # a partial read is not kept
    first, again = list(iter_shard(url)), list(iter_shard(url))
    assert again == first and [s["__key__"] for s in first] == ["k0", "k1", "k2"] and len(parsed) == 2
    write_samples(tmp_path / "a.tar", [(f"n{i}", png_sample(i, b"1")) for i in range(2)])
    assert [s["__key__"] for s in iter_shard(url)] == ["n0", "n1"] and len(parsed) == 3
    assert [k for k in shards_module._shard_cache if k.endswith("a.tar")] == [os.path.abspath(url)]  # replaced
    assert [s["__key__"] for s in iter_shard(url)] == ["n0", "n1"] and len(parsed) == 3
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])  # inside the first png member: ends early
    cut = str(tmp_path / "cut.tar")
    assert list(iter_shard(cut, quiet=True)) == list(iter_shard(cut, quiet=True)) and len(parsed) == 5


def test_small_images_are_decoded_once_and_crops_are_unchanged(tmp_path, monkeypatch):
    """The loader decodes a small image once per process (tiny-digits' loader: 17.7 -> 1.6 ms of
    CPU a batch on a 2-core EPYC); the batches are those of a fresh decode every time, the kept
    pixels are read-only, and an image over MEMO_IMAGE_BYTES is decoded every time."""
    import deit.data.decode as decode_module
    from deit import crop

    url = write_samples(tmp_path / "m.tar", [(f"k{i}", png_sample(i, b"%d" % DIGITS.target[i])) for i in range(8)])
    cfg = dataclasses.replace(config(url), data=dataclasses.replace(config(url).data, train_batch_size=8))
    monkeypatch.setattr(decode_module, "_memo", Kept(decode_module.MEMO_TOTAL_BYTES))
    fresh = take(train_batches(cfg), 3)  # 3 epochs of the 8 samples
    kept = {k: decode_module._memo.get(k) for k in decode_module._memo}
    assert len(kept) == 8 and all(not a.flags.writeable for a in kept.values())
    calls = []
    real = decode_module.decode_image
    monkeypatch.setattr(decode_module, "decode_image", lambda data: (calls.append(1), real(data))[1])
    again = take(train_batches(cfg), 3)
    assert calls == [] and all((a == b).all() for x, y in zip(fresh, again) for a, b in zip(x, y))
    big = Image.fromarray(np.zeros((160, 160, 3), np.uint8))  # 76,800 bytes decoded
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    decode_module.decode_kept(buf.getvalue())
    decode_module.decode_kept(buf.getvalue())
    assert len(calls) == 2 and buf.getvalue() not in decode_module._memo
    with pytest.raises(ValueError, match="random_crop='rrc' draws a crop"):
        crop.train_crop(None, np.zeros((8, 8, 3), np.uint8), 8, "rrc")


def test_bad_label_skipped_counted_and_named_once(tmp_path, caplog):
    samples = [("k0", png_sample(0, b"3")), ("k-bad", png_sample(1, b"10")), ("k2", png_sample(2, b"-1")),
               ("k3", png_sample(3, b"4"))]
    url = write_samples(tmp_path / "bad.tar", samples)
    loader = valid_batches(config(url))
    (x, y, m), = list(loader)
    assert m.sum() == 2 and loader.skipped == 2 and y[m].tolist() == [3, 4]
    warned = [r.getMessage() for r in caplog.records if "bad.tar" in r.getMessage()]
    assert len(warned) == 1 and "'k-bad'" in warned[0] and "label 10, outside [0, 10)" in warned[0], warned


def test_corrupt_samples_skipped_and_counted(tmp_path):
    samples = [(f"g{i}", png_sample(i, b"%d" % DIGITS.target[i])) for i in range(6)]
    samples[1] = ("junk", {"png": b"not an image", "cls": b"1"})
    samples[4] = ("nolabel", png_sample(4, None))
    url = write_samples(tmp_path / "c.tar", samples)
    loader = valid_batches(config(url))
    (x, y, m), = list(loader)
    assert m.sum() == 4 and loader.skipped == 2
    assert y[m].tolist() == [int(DIGITS.target[i]) for i in (0, 2, 3, 5)]
    train = train_batches(dataclasses.replace(config(url), data=dataclasses.replace(
        config(url).data, train_batch_size=8)))
    take(train, 2)
    assert train.skipped >= 2 and train.state["skipped"] == train.skipped


def test_resume_is_exact(shards):
    cfg = config(shards[0], random_crop="rrc", augment_repeats=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_batch_size=512, shuffle_buffer=300))
    loader = train_batches(cfg)
    full, states = [], []
    for _ in range(7):  # 1437 / 256 distinct per batch: crosses the epoch boundary
        full.append(next(loader))
        states.append(dict(loader.state))
    loader.close()
    assert states[4]["epoch"] == 0 and states[5]["epoch"] == 1
    for resumed in (train_batches(cfg, state=states[3]), train_batches(cfg, start_step=4)):
        for (x, y), (x2, y2) in zip(full[4:], take(resumed, 3), strict=True):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
    assert skip_state(expand_shards(shards[0]), cfg, 0, 1, 4) == states[3]


def test_workers_give_the_same_batches(shards):
    cfg = config(shards[0], random_crop="rrc")
    workers = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_loader_workers=2))
    for (x, y), (x2, y2) in zip(take(train_batches(cfg), 2), take(train_batches(workers), 2)):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_prepare_folder(tmp_path):
    import json

    import prepare

    src = tmp_path / "train"
    for i in range(10):
        cls = ["cat", "dog", "emu"][int(DIGITS.target[i]) % 3]
        (src / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit_image(DIGITS.images[i])).save(src / cls / f"img.{i}.{'png' if i % 2 else 'JPEG'}")
    (src / "cat" / "notes.txt").write_text("not an image")
    prepare.main(["folder", str(src), str(tmp_path / "out"), "--shard-size", "4", "--no-progress"])
    classes = json.loads((tmp_path / "out" / "train-classes.json").read_text())
    assert classes == {"cat": 0, "dog": 1, "emu": 2}
    urls = expand_shards(str(tmp_path / "out" / "train-{0000..0002}.tar"))
    samples = [s for u in urls for s in iter_shard(u)]
    assert len(samples) == 10 and sum(map(count_samples, urls)) == 10
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == classes[meta["path"].split("/")[0]]
        assert s.get("jpg", s.get("png")) == (src / meta["path"]).read_bytes()
    x, y, m = next(iter(valid_batches(config(urls[0]))))
    assert m.sum() == 4
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.fromarray(digit_image(DIGITS.images[0])).save(tmp_path / "val" / "cat" / "a.png")
    spec, _ = prepare_folder(tmp_path / "val", tmp_path / "out", classes=tmp_path / "out" / "train-classes.json",
                                  progress=False)
    assert [int(s["cls"]) for s in iter_shard(expand_shards(spec)[0])] == [0]
    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match="'yak'"):
        prepare_folder(tmp_path / "val", tmp_path / "out", classes=tmp_path / "out" / "train-classes.json")


def test_benchmark_loader(shards, tmp_path):
    from benchmarks import loader_bench

    result = loader_bench.benchmark_loader(shards[0], image_size=32, batch_size=32, batches=3, warmup=1)
    assert result["batches"] == 3 and result["images_per_s"] > 0 and result["skipped"] == 0
    assert result["images_per_s_per_core"] == result["images_per_s"]
    spec = loader_bench.photo_shards(tmp_path, 6, size=(64, 48), shard_size=4)
    result = loader_bench.benchmark_loader(spec, split="valid", image_size=32, batch_size=4, batches=5, warmup=0)
    assert result["batches"] == 2 and result["random_crop"] == "eval"


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2), (1, 3)])  # (1, 3): split by sample
def test_start_step_counts_unlabelled_samples(tmp_path, process_index, process_count):
    paths = []
    for s in range(2):  # 10 samples in 2 shards, 2 without a label
        samples = [(f"s{s}-{i}", png_sample(5 * s + i, None if i == 2 else b"%d" % DIGITS.target[5 * s + i]))
                   for i in range(5)]
        paths.append(write_samples(tmp_path / f"u-{s}.tar", samples))
    cfg = config(str(tmp_path / "u-{0..1}.tar"), random_crop="rrc")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_batch_size=6, shuffle_buffer=4))
    proc = dict(process_index=process_index, process_count=process_count)
    loader = train_batches(cfg, **proc)
    full, states = [], []
    for _ in range(7):
        full.append(next(loader))
        states.append(dict(loader.state))
    loader.close()
    assert states[-1]["epoch"] >= 2 and states[-1]["skipped"] >= 2
    urls = expand_shards(cfg.data.train_dataset_shards)
    for step in range(1, 7):
        assert skip_state(urls, cfg, process_index, process_count, step) == states[step - 1]
    for (x, y), (x2, y2) in zip(full[5:], take(train_batches(cfg, start_step=5, **proc), 2), strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_all_corrupt_training_data_raises(tmp_path):
    url = write_samples(tmp_path / "junk.tar", [(f"j{i}", {"png": b"junk", "cls": b"1"}) for i in range(3)])
    with pytest.raises(ValueError, match="has no usable sample among the first 16"):  # up front
        next(train_batches(config(url)))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_decode_image_equals_pillow_for_every_jpeg_kind():
    """simplejpeg (YCbCr / grayscale JPEGs) gives Pillow's pixels exactly; CMYK, PNG and
    recoverably-corrupt JPEGs go to Pillow; unreadable bytes give None."""
    import simplejpeg
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((333, 251))
    ycc = _jpeg(img, quality=90)
    png = io.BytesIO()
    img.save(png, format="PNG")
    cases = {f"subsampling={s}, progressive={p}": _jpeg(img, quality=90, subsampling=s, progressive=p)
             for s in (0, 1, 2) for p in (False, True)}
    cases |= {"gray": _jpeg(img.convert("L")), "cmyk": _jpeg(img.convert("CMYK")), "png": png.getvalue(),
              "extra bytes before EOI": ycc[:-2] + b"\0" * 10 + ycc[-2:]}
    for name, b in cases.items():
        with Image.open(io.BytesIO(b)) as ref:
            expected = np.asarray(ref.convert("RGB"))
        ours = decode_image(b)
        assert ours.dtype == np.uint8 and ours.shape == (251, 333, 3), name
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    # the fast path really is taken for plain JPEGs (and Pillow's pixels agree with it)
    np.testing.assert_array_equal(simplejpeg.decode_jpeg(ycc, "RGB"), decode_image(ycc))
    assert decode_image(ycc[: len(ycc) // 2]) is None and decode_image(b"not an image") is None
    assert decode_image(None) is None


@pytest.mark.parametrize("order", ["horizontal first", "vertical first"])
def test_resize_is_pillow_bicubic(order):
    """crop.resize recomputes Pillow's antialiased bicubic: up, down, mixed, non-square, tiny
    and crop-view inputs agree with Image.resize(BICUBIC) to within 1 on a handful of values;
    a shifted or box-filtered result would differ by far more."""
    import skimage.data

    from deit import crop

    src = skimage.data.astronaut()
    rng = np.random.default_rng(0 if order == "horizontal first" else 1)
    diffs, n, worst = 0, 0, 0
    for i in range(60):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        out_w, out_h = (224, 224) if i % 2 else (int(v) for v in rng.integers(1, 300, 2))
        if order == "vertical first":  # Pillow's rule: the height shrinks more than twice the width
            h = int(rng.integers(100, 512))
            out_w, out_h = max(1, w - int(rng.integers(0, 5))), int(rng.integers(1, h - 20))
        y, x = int(rng.integers(0, 512 - h + 1)), int(rng.integers(0, 512 - w + 1))
        view = src[y:y + h, x:x + w]  # a strided view, as the loader's crops
        expected = np.asarray(Image.fromarray(view).resize((out_w, out_h), Image.Resampling.BICUBIC))
        ours = crop.resize(view, out_w, out_h)
        assert ours.shape == expected.shape and ours.dtype == np.uint8
        d = np.abs(ours.astype(int) - expected)
        worst, diffs, n = max(worst, int(d.max())), diffs + int((d > 0).sum()), n + d.size
    assert worst <= 1 and diffs / n < 1e-4, (worst, diffs / n)
    img = src[:300, :200]
    assert crop.resize(img, 200, 300) is img
    # downscaling is antialiased: a 1-pixel checkerboard halved comes out flat grey
    board = np.broadcast_to(((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None], (64, 64, 3))
    assert np.ptp(crop.resize(board, 32, 32)[4:-4, 4:-4]) <= 2
