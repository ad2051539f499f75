"""src/predict.py: top-k classes per image from a saved model, class names, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

import deit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import predict as predict_cli  # noqa: E402

LABELS = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    cfg = deit.ModelConfig(layers=2, dim=32, heads=2, labels=LABELS, patch_size=8, image_size=32)
    model = deit.init_model(cfg, seed=3)
    ckpt = deit.save_model(model, d / "model.safetensors")
    paths = {
        "cat.jpg": skimage.data.chelsea(),                  # 300x451 RGB, landscape
        "astronaut.png": skimage.data.astronaut(),          # 512x512
        "camera.png": skimage.data.camera(),                # grayscale, mode L
        "tall.png": np.ascontiguousarray(skimage.data.coffee().transpose(1, 0, 2)),  # portrait
    }
    for name, arr in paths.items():
        Image.fromarray(arr).save(d / name)
    Image.fromarray(skimage.data.rocket()).convert("RGBA").save(d / "rgba.png")
    (d / "not-an-image.jpg").write_text("hello")
    return d, ckpt, model


def reference_probs(model, path: Path, ratio: float = 0.875) -> np.ndarray:
    """Written out independently of deit.crop: PIL bicubic resize of the shorter side, center crop."""
    img = Image.open(path).convert("RGB")
    size = model.cfg.image_size
    short = int(size / ratio)
    w, h = img.size
    img = img.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    arr = np.asarray(img.crop((left, top, left + size, top + size)))[None]
    return np.asarray(jax.nn.softmax(deit.predict(model, arr), axis=-1))[0]


def run_main(capsys, *args) -> tuple[int, list[dict], str]:
    code = predict_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, [json.loads(ln) for ln in out.splitlines()], err


def test_top_k_sorted_and_equal_to_the_model(files, capsys):
    d, ckpt, model = files
    images = [d / "cat.jpg", d / "astronaut.png", d / "camera.png", d / "tall.png", d / "rgba.png"]
    code, rows, err = run_main(capsys, "--checkpoint", ckpt, *images, "--batch-size", "2")
    assert code == 0, err
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for path, row in zip(images, rows):
        top = row["top_k"]
        probs = [t["prob"] for t in top]
        assert len(top) == 5 and len({t["index"] for t in top}) == 5
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert all(t["name"] is None for t in top)
        ref = reference_probs(model, path)
        assert [t["index"] for t in top] == list(np.argsort(-ref, kind="stable")[:5])
        np.testing.assert_allclose(probs, np.sort(ref)[::-1][:5], rtol=1e-5, atol=1e-6)
    # different photos, different predictions: the image really reaches the model
    assert len({tuple(round(t["prob"], 6) for t in r["top_k"]) for r in rows}) == len(rows)


def test_class_names_list_and_dict_and_all_labels(files, capsys, tmp_path):
    d, ckpt, model = files
    names = [f"class-{i}" for i in range(LABELS)]
    (tmp_path / "list.json").write_text(json.dumps(names))
    code, rows, _ = run_main(capsys, "--checkpoint", ckpt, d / "cat.jpg", "--class-names", tmp_path / "list.json",
                             "--top-k", "100")
    assert code == 0
    top = rows[0]["top_k"]
    assert len(top) == LABELS  # k is capped at the label count; then the probabilities sum to 1
    assert abs(sum(t["prob"] for t in top) - 1) < 1e-5
    assert all(t["name"] == names[t["index"]] for t in top)

    (tmp_path / "dict.json").write_text(json.dumps({"0": "zero", "3": "three"}))
    code, rows, _ = run_main(capsys, "--checkpoint", ckpt, d / "cat.jpg", "--class-names", tmp_path / "dict.json",
                             "--top-k", "7")
    assert code == 0
    got = {t["index"]: t["name"] for t in rows[0]["top_k"]}
    assert got == {0: "zero", 3: "three"} | {i: None for i in (1, 2, 4, 5, 6)}


def test_crop_ratio_comes_from_a_training_checkpoint(files, capsys, tmp_path):
    d, ckpt, model = files
    run_dir = tmp_path / "last"
    run_dir.mkdir()
    deit.save_model(model, run_dir)
    (run_dir / "meta.json").write_text(json.dumps({"config": {"augment": {"test_crop_ratio": 1.0}}}))
    code, rows, _ = run_main(capsys, "--checkpoint", run_dir, d / "cat.jpg")
    assert code == 0
    ref = reference_probs(model, d / "cat.jpg", ratio=1.0)
    np.testing.assert_allclose([t["prob"] for t in rows[0]["top_k"]], np.sort(ref)[::-1][:5], rtol=1e-5, atol=1e-6)
    assert predict_cli.default_crop_ratio(str(run_dir / "model.safetensors")) == 1.0
    assert predict_cli.default_crop_ratio(str(ckpt)) == 0.875


@pytest.mark.parametrize("case", ["missing", "not-image", "bad-json", "short-list", "bad-index", "not-names",
                                  "bad-checkpoint", "top-k"])
def test_bad_input_one_line_exit_2(files, capsys, tmp_path, case):
    d, ckpt, _ = files
    args = ["--checkpoint", ckpt, d / "cat.jpg"]
    named = {"missing": "nope.png", "not-image": "not-an-image.jpg", "bad-json": "names.json",
             "short-list": "names.json", "bad-index": "names.json", "not-names": "names.json",
             "bad-checkpoint": "missing.safetensors", "top-k": "top_k=0"}[case]
    names = tmp_path / "names.json"
    if case == "missing":
        args.append(d / "nope.png")
    elif case == "not-image":
        args.append(d / "not-an-image.jpg")
    elif case == "bad-checkpoint":
        args[1] = tmp_path / "missing.safetensors"
    elif case == "top-k":
        args += ["--top-k", "0"]
    else:
        names.write_text({"bad-json": "[1, 2", "short-list": json.dumps(["a", "b"]),
                          "bad-index": json.dumps({"9": "x"}), "not-names": json.dumps([1] * LABELS)}[case])
        args += ["--class-names", names]
    code, rows, err = run_main(capsys, *args)
    assert code == 2
    assert rows == []  # nothing printed for the good image either
    assert len(err.strip().splitlines()) == 1 and err.startswith("predict: error:")
    assert named in err


def test_cli_subprocess(files):
    d, ckpt, _ = files
    env = {**os.environ, "XLA_FLAGS": ""}
    cmd = [sys.executable, str(ROOT / "src" / "predict.py"), "--checkpoint", str(ckpt)]
    r = subprocess.run(cmd + [str(d / "cat.jpg"), str(d / "camera.png")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [Path(x["path"]).name for x in rows] == ["cat.jpg", "camera.png"]
    r = subprocess.run(cmd + [str(d / "nope.png")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and "nope.png" in r.stderr
