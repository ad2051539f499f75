"""Bad training / validation data (issue 15): a bad shard or spec is one line on stderr naming it
and what is allowed, exit 2, nothing written; a bad sample is skipped and counted (or, for the
image modes timm's loader reads, decoded to RGB) and the run goes on.

Every test is parametrized over `MATRIX` (tests/matrix.py prints the README's table from it).
"""

import functools
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT / "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

from matrix import Case  # noqa: E402

from deit.data.prepare import digit_image, encode_png, write_shard  # noqa: E402

TINY = ["recipes:tiny-digits", "--no-progress", "--layers", "2", "--dim", "32", "--heads", "2"]

SKIPPED = "skipped, counted in train/skipped_samples and val/skipped"
DECODED = "decoded to RGB as PIL convert('RGB')"
DECODED16 = "decoded to RGB, 16 bits scaled to 8 (v >> 8; PIL's convert clips to white)"


def shards(what: str, sees: str) -> Case:
    return Case(kind="shards", what=what, sees=sees)


def sample(what: str, sees: str) -> Case:
    return Case(kind="sample", what=what, sees=sees, exit="0",
                lost="the sample (counted)" if sees == SKIPPED else "nothing")


SHARD_CASES = [
    shards("missing shard file", "does not exist"),
    shards("some files of a brace range missing", "does not exist (1 of 3 shards missing)"),
    shards("brace range matching nothing", "matches no shards"),
    shards("a directory as shard", "is a directory, not a file"),
    shards("a PNG named .tar", "is not a tar archive (its first 512 bytes are not a tar header)"),
    shards("a short text file named .tar", "is not a tar archive"),
    shards("truncated tar (cut mid-block)", "is truncated"),
    shards("truncated tar (cut at a 512-byte block)", "does not end with the two zero 512-byte blocks"),
    shards("zero-length tar", "is empty (0 bytes)"),
    shards("tar without members", "holds no samples (an empty tar archive)"),
    shards("every sample corrupt (garbage image bytes)", "has no usable sample among the first 16"),
    shards("every label not an integer", "has no usable sample among the first 16"),
]
REMOTE_CASES = [
    Case(kind="shards", what="pipe: shard truncated, found while training", sees="ends early",
         exit="—", lost="the unread rest of the shard (warned once)"),
    Case(kind="shards", what="pipe: shards, every sample corrupt", sees="no decodable training samples",
         exit="2", lost="nothing (stops after one pass, before step 1: config.json, no checkpoint)"),
]
SAMPLE_CASES = [
    sample("16-bit grayscale PNG (I;16)", DECODED16),
    sample("grayscale JPEG (L)", DECODED),
    sample("grayscale PNG (L)", DECODED),
    sample("palette PNG (P)", DECODED),
    sample("palette PNG with transparency (P + tRNS)", DECODED),
    sample("CMYK JPEG", DECODED),
    sample("grayscale + alpha PNG (LA)", DECODED),
    sample("RGBA PNG", DECODED),
    sample(".cls not an integer (b'cat')", SKIPPED),
    sample(".cls a decimal (b'1.5')", SKIPPED),
    sample(".cls empty (b'')", SKIPPED),
    sample(".cls not UTF-8", SKIPPED),
    sample("label outside [0, labels) (b'10')", SKIPPED),
    sample("negative label (b'-1')", SKIPPED),
    sample("no .cls member", SKIPPED),
    sample("garbage image bytes", SKIPPED),
    sample("no image member", SKIPPED),
]
MATRIX = SHARD_CASES + REMOTE_CASES + SAMPLE_CASES


def ids(cases: list[Case]) -> list[str]:
    return [c.what for c in cases]


# ----------------------------------------------------------------------------- samples

@functools.cache
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit(i: int) -> np.ndarray:
    return digit_image(digits().images[i])


def label(i: int) -> bytes:
    return b"%d" % digits().target[i]


def good(i: int) -> tuple[str, dict[str, bytes]]:
    return f"good-{i:05d}", {"png": encode_png(digit(i)), "cls": label(i)}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def colour(i: int) -> np.ndarray:
    """A digit tinted, so RGB conversions have three different channels to get right."""
    return (digit(i) * np.array([1.0, 0.6, 0.3])).astype(np.uint8)


def sixteen_bit(i: int) -> np.ndarray:
    """A digit as 16-bit grey: most values above 255 (PIL's convert would make them white)."""
    return digit(i)[..., 0].astype(np.uint16) * 257 + np.uint16(i % 200)


IMAGES: dict[str, Callable[[int], bytes]] = {
    "16-bit grayscale PNG (I;16)": lambda i: encode(Image.fromarray(sixteen_bit(i)), "PNG"),
    "grayscale JPEG (L)": lambda i: encode(Image.fromarray(digit(i)[..., 0]), "JPEG", quality=90),
    "grayscale PNG (L)": lambda i: encode(Image.fromarray(digit(i)[..., 0]), "PNG"),
    "palette PNG (P)": lambda i: encode(Image.fromarray(colour(i)).quantize(16), "PNG"),
    "palette PNG with transparency (P + tRNS)":
        lambda i: encode(Image.fromarray(colour(i)).quantize(16), "PNG", transparency=bytes(range(0, 256, 16))),
    "CMYK JPEG": lambda i: encode(Image.fromarray(colour(i)).convert("CMYK"), "JPEG", quality=90),
    "grayscale + alpha PNG (LA)": lambda i: encode(Image.fromarray(
        np.stack([digit(i)[..., 0], np.full((32, 32), 128, np.uint8)], -1), "LA"), "PNG"),
    "RGBA PNG": lambda i: encode(Image.fromarray(
        np.concatenate([colour(i), np.full((32, 32, 1), 77, np.uint8)], -1), "RGBA"), "PNG"),
}
MODES = {"16-bit grayscale PNG (I;16)": "I;16", "grayscale JPEG (L)": "L", "grayscale PNG (L)": "L",
         "palette PNG (P)": "P", "palette PNG with transparency (P + tRNS)": "P", "CMYK JPEG": "CMYK",
         "grayscale + alpha PNG (LA)": "LA", "RGBA PNG": "RGBA"}
LABELS = {".cls not an integer (b'cat')": b"cat", ".cls a decimal (b'1.5')": b"1.5", ".cls empty (b'')": b"",
          ".cls not UTF-8": b"\xff\xfe\x80", "label outside [0, labels) (b'10')": b"10",
          "negative label (b'-1')": b"-1"}


def sample_files(case: Case, i: int) -> dict[str, bytes]:
    """The members of a sample of kind `case`, made from digit i."""
    if case.what in IMAGES:
        return {"png" if b"PNG" in IMAGES[case.what](i)[:8] else "jpg": IMAGES[case.what](i), "cls": label(i)}
    if case.what in LABELS:
        return {"png": encode_png(digit(i)), "cls": LABELS[case.what]}
    return {"no .cls member": {"png": encode_png(digit(i))}, "garbage image bytes": {"png": b"\x89PNG garbage",
            "cls": label(i)}, "no image member": {"cls": label(i)}}[case.what]


def pil_rgb(data: bytes) -> np.ndarray:
    """What timm's loader gives: PIL's convert('RGB')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # P + byte-string transparency: Pillow suggests going through RGBA
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))


def shifted16(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.repeat((np.asarray(img) >> 8).astype(np.uint8)[..., None], 3, axis=2)


def config(spec: str):
    """Digits-sized loader config: batches of 8, the eval crop of a 32x32 image is the image."""
    from deit.config import AugmentConfig, Config, DataConfig, ModelConfig

    return Config(model=ModelConfig(layers=1, dim=32, heads=2, labels=10, patch_size=4, image_size=32),
                  data=DataConfig(train_dataset_shards=spec, valid_dataset_shards=spec, train_batch_size=8,
                                  valid_batch_size=8),
                  augment=AugmentConfig(test_crop_ratio=1.0))


# ----------------------------------------------------------------------------- shard-level cases

def good_shard(path: Path, n: int = 20, start: int = 0) -> str:
    write_shard(path, [good(i) for i in range(start, start + n)])
    return str(path)


def bad_spec(what: str, d: Path) -> tuple[str, str]:
    """(spec, the path or spec the message must name) for a shard-level case, built under d."""
    if what == "missing shard file":
        return str(d / "x" / "train-0000.tar"), str(d / "x" / "train-0000.tar")
    if what == "some files of a brace range missing":
        good_shard(d / "part-0.tar")
        good_shard(d / "part-2.tar")
        return str(d / "part-{0..2}.tar"), str(d / "part-1.tar")
    if what == "brace range matching nothing":
        return "/nonexistent/train-{0000..0003}.tar", "/nonexistent/train-{0000..0003}.tar"
    path = d / "bad.tar"
    if what == "a directory as shard":
        path.mkdir()
    elif what == "a PNG named .tar":
        path.write_bytes(encode_png(digit(0)) * 10)
    elif what == "a short text file named .tar":
        path.write_text("this is not a tar archive\n")
    elif what.startswith("truncated tar"):
        good_shard(d / "whole.tar")
        blob = (d / "whole.tar").read_bytes()
        cut = len(blob) // 2 + (0 if "512" in what else 100)
        path.write_bytes(blob[: cut - cut % 512 if "512" in what else cut])
    elif what == "zero-length tar":
        path.write_bytes(b"")
    elif what == "tar without members":
        write_shard(path, [])
    elif what == "every sample corrupt (garbage image bytes)":
        write_shard(path, [(f"j{i}", {"png": b"\x89PNG garbage", "cls": b"1"}) for i in range(40)])
    elif what == "every label not an integer":
        write_shard(path, [(f"k{i}", {"png": encode_png(digit(i)), "cls": b"one"}) for i in range(40)])
    else:
        raise AssertionError(what)
    return str(path), str(path)


@pytest.fixture
def train_cli(monkeypatch, tmp_path):
    monkeypatch.setenv("DEIT_CACHE", str(tmp_path / "cache"))  # digits:valid, if it were reached
    import train

    return train


@pytest.mark.parametrize("role", ["train", "valid"])
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_bad_shards_one_line_exit_2_nothing_written(case, role, tmp_path, capsys, train_cli):
    spec, named = bad_spec(case.what, tmp_path)
    if role == "train":
        args = ["--train-dataset-shards", spec]
    else:
        args = ["--train-dataset-shards", good_shard(tmp_path / "good.tar"), "--valid-dataset-shards", spec]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # in-process: conftest gives 8 fake devices
        train_cli.main([*TINY, "--output-dir", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert case.sees in err[0] and named in err[0] and "; allowed: " in err[0], err
    assert not out.exists()


def test_check_is_memoised_and_names_the_first_of_many_bad(tmp_path):
    """Many shards are checked in a thread pool; the first bad one (in spec order) is named with
    how many more are bad; a rewritten shard is checked again (mtime and size are the key)."""
    from deit.data.loader import resolve_shards

    for s in range(8):
        good_shard(tmp_path / f"s-{s}.tar", n=2, start=s)
    spec = str(tmp_path / "s-{0..7}.tar")
    assert len(resolve_shards(spec)) == 8
    for s in (3, 6):
        (tmp_path / f"s-{s}.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"s-3\.tar of spec .* is empty \(0 bytes\) \(1 more of its 8 shards"):
        resolve_shards(spec)


# ----------------------------------------------------------------------------- remote (lazily checked) shards

@pytest.mark.parametrize("case", REMOTE_CASES[:1], ids=ids(REMOTE_CASES[:1]))
def test_remote_truncated_shard_uses_its_readable_part(case, tmp_path, caplog):
    from deit.data.loader import train_batches, valid_batches

    good_shard(tmp_path / "whole.tar", n=20)
    blob = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(blob[: len(blob) // 2])
    url = f"pipe:cat {tmp_path / 'cut.tar'}"
    loader = valid_batches(config(url))
    n = sum(int(m.sum()) for _, _, m in loader)
    read = n + loader.skipped  # the sample cut in the middle has lost its label, or its image
    assert 5 <= n < 20 and loader.skipped <= 1
    train = train_batches(config(url))
    for _ in range(2 * 20 // 8 + 2):  # a few passes over the shard
        next(train)
    train.close()
    warned = [r.getMessage() for r in caplog.records if case.sees in r.getMessage()]
    assert len(warned) == 1 and url in warned[0] and f"using the {read} sample(s) read before" in warned[0], warned


@pytest.mark.parametrize("case", REMOTE_CASES[1:], ids=ids(REMOTE_CASES[1:]))
def test_remote_all_corrupt_stops_after_one_pass(case, tmp_path, capsys, train_cli):
    write_shard(tmp_path / "junk.tar", [(f"j{i}", {"png": b"\x89PNG garbage", "cls": b"1"}) for i in range(40)])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_cli.main([*TINY, "--output-dir", str(out), "--train-dataset-shards", f"pipe:cat {tmp_path / 'junk.tar'}",
                        "--valid-dataset-shards", good_shard(tmp_path / "good.tar")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and case.sees in err[-1] and "(40 skipped so far)" in err[-1], err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]  # not a step was logged
    assert (out / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- per-sample cases

COPIES_TRAIN, COPIES_VALID, STEPS = 4, 2, 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short CLI run on shards mixing good digits with COPIES of every sample case; the
    counts it logged and the exact counts a replay of the record order expects."""
    from deit.data.order import train_records
    from deit.data.shards import expand_shards

    d = tmp_path_factory.mktemp("samples")
    bad_keys, n = set(), len(SAMPLE_CASES)
    train = [good(i) for i in range(300)]
    for c, case in enumerate(SAMPLE_CASES):
        for k in range(COPIES_TRAIN):
            key = f"case-{c:02d}-{k}"
            train.insert((c * COPIES_TRAIN + k) * 300 // (n * COPIES_TRAIN), (key, sample_files(case, 300 + k)))
            bad_keys |= {key} if case.sees == SKIPPED else set()
    write_shard(d / "train-0.tar", train[: len(train) // 2])
    write_shard(d / "train-1.tar", train[len(train) // 2:])
    valid = [good(i) for i in range(1400, 1500)]
    valid += [(f"case-{c:02d}-{k}", sample_files(case, 1500 + k)) for c, case in enumerate(SAMPLE_CASES)
              for k in range(COPIES_VALID)]
    write_shard(d / "valid-0.tar", valid)
    out = d / "run"
    spec = str(d / "train-{0..1}.tar")
    env = {**os.environ, "XLA_FLAGS": "", "DEIT_CACHE": str(d / "cache")}
    r = subprocess.run([sys.executable, "src/train.py", *TINY, "--training-steps", str(STEPS), "--log-interval",
                        str(STEPS), "--eval-interval", str(STEPS), "--train-dataset-shards", spec,
                        "--valid-dataset-shards", str(d / "valid-0.tar"), "--output-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())
    flat = {k: v for section in cfg.values() if isinstance(section, dict) for k, v in section.items()}
    # Replay: the loader's count after the last batch is the bad records before the need-th good one.
    need = -(-STEPS * flat["train_batch_size"] // flat["augment_repeats"])
    good_seen = skipped = 0
    for _, _, rec in train_records(expand_shards(spec), flat["shuffle_seed"], flat["shuffle_buffer"], flat["labels"],
                                   0, 1):
        if rec.key in bad_keys:
            skipped += 1
        else:
            good_seen += 1
            if good_seen == need:
                break
    n_bad_valid = COPIES_VALID * sum(c.sees == SKIPPED for c in SAMPLE_CASES)
    return {"returncode": r.returncode, "stderr": r.stderr,
            "train": next(e for e in events if "train/loss" in e), "val": next(e for e in events if "val/acc1" in e),
            "expected_train_skipped": skipped, "expected_val_skipped": n_bad_valid,
            "expected_val_samples": len(valid) - n_bad_valid}


def loader_outcome(case: Case, tmp_path: Path) -> tuple[str, np.ndarray | None]:
    """Read a shard [good, case, good] with the valid and train loaders: SKIPPED if both skip and
    count it, else the decoded image (checked against PIL by the caller)."""
    from deit.data.loader import train_batches, valid_batches

    url = str(tmp_path / "one.tar")
    write_shard(url, [good(1), ("case", sample_files(case, 7)), good(2)])
    cfg = config(url)
    valid = valid_batches(cfg)
    (x, y, m), = list(valid)
    train = train_batches(cfg)
    for _ in range(3):  # 24 slots: 8 or more passes over the shard
        next(train)
    train.close()
    if valid.skipped == 1 and m.sum() == 2 and train.skipped >= 1:
        return SKIPPED, None
    assert valid.skipped == 0 and m.sum() == 3 and train.skipped == 0
    assert y[m].tolist() == [int(label(i)) for i in (1, 7, 2)]
    return "decoded", x[1]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=ids(SAMPLE_CASES))
def test_bad_sample_skipped_and_counted_or_decoded(case, tmp_path, trained):
    from deit.data.decode import decode_image

    outcome, seen = loader_outcome(case, tmp_path)
    if outcome == "decoded":
        data = sample_files(case, 7)
        data = data.get("png", data.get("jpg"))
        with Image.open(io.BytesIO(data)) as img:  # the case holds the mode it names
            assert img.mode == MODES[case.what] and ("transparency" in img.info) == ("tRNS" in case.what)
        ours = decode_image(data)
        np.testing.assert_array_equal(seen, ours)  # the eval crop of a 32x32 image is the image
        assert ours.dtype == np.uint8 and ours.shape == (32, 32, 3)
        if np.array_equal(ours, pil_rgb(data)):
            outcome = DECODED
        elif np.array_equal(ours, shifted16(data)):
            with Image.open(io.BytesIO(data)) as img:  # why: PIL clips every 16-bit value above 255 to white
                assert np.array_equal(pil_rgb(data)[..., 0], np.minimum(np.asarray(img), 255))
            outcome = DECODED16
    assert outcome == case.sees
    # the CLI run with every case mixed in trained through them and counted exactly
    assert trained["returncode"] == 0
    assert trained["train"]["train/skipped_samples"] == trained["expected_train_skipped"] > 0
    assert trained["val"]["val/skipped"] == trained["expected_val_skipped"]
    assert trained["val"]["val/num_samples"] == trained["expected_val_samples"]
    if case.what in LABELS:  # one warning line per shard at most, naming the sample, its label, what is allowed
        lines = [ln for ln in trained["stderr"].splitlines() if "skipping sample" in ln and "label" in ln]
        assert len(lines) <= 3 and all("allowed: an integer in [0, 10)" in ln for ln in lines), lines
