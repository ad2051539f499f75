"""Fine-tuning from a pretrained model: position resize, head mapping, structure checks, wiring."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deit
from deit import optim, recipes, sharding
from deit.config import Config, ModelConfig, from_flat
from deit.finetune import adapt_pretrained, load_label_mapping, load_pretrained, resize_pos_embed
from deit.deit3_jax_weights import deit3_jax_shapes
from deit3_jax_tree import flax_msgpack_bytes

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(layers=2, dim=32, heads=2, labels=20, patch_size=4, image_size=16, layerscale=True)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def random_model(cfg: ModelConfig, seed: int) -> deit.ViT:
    """Every array random, filled on the host (no init compile; fresh biases are zero and
    LayerNorms one, too easy to match by chance)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
                        if isinstance(x, jax.ShapeDtypeStruct) else x, skeleton(cfg))


def skeleton(cfg: ModelConfig) -> deit.ViT:
    return eqx.filter_eval_shape(deit.ViT, cfg, key=jax.random.key(0))


@pytest.fixture(scope="module")
def pretrained() -> deit.ViT:
    return random_model(SMALL, seed=1)


def test_same_config_copies_exactly(pretrained):
    target = random_model(SMALL, seed=5)
    out = adapt_pretrained(pretrained, target)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = images(4, 16)
    np.testing.assert_array_equal(np.asarray(deit.predict(out, x)), np.asarray(deit.predict(pretrained, x)))


def test_pos_embed_resize_matches_independent_bicubic(pretrained):
    target = random_model(dataclasses.replace(SMALL, image_size=24), seed=5)  # grid 4x4 -> 6x6
    out = adapt_pretrained(pretrained, target)
    assert out.cfg == target.cfg and out.pos_embed.shape == (36, 32)
    grid = np.asarray(pretrained.pos_embed).reshape(4, 4, 32)
    expected = jax.image.resize(grid, (6, 6, 32), "bicubic").reshape(36, 32)
    np.testing.assert_allclose(np.asarray(out.pos_embed), np.asarray(expected), rtol=0, atol=1e-6)
    # Resampling is not a copy: corners move and the grid is not a nearest-neighbour repeat.
    assert not np.allclose(np.asarray(out.pos_embed)[:16], np.asarray(pretrained.pos_embed))
    np.testing.assert_array_equal(np.asarray(out.blocks.attn.qkv.weight), np.asarray(pretrained.blocks.attn.qkv.weight))
    assert deit.predict(out, images(2, 24)).shape == (2, 20)
    same = resize_pos_embed(pretrained.pos_embed, 4)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(pretrained.pos_embed))


def test_sincos2d_needs_no_position_weights():
    cfg = dataclasses.replace(SMALL, posemb="sincos2d")
    pre = random_model(cfg, seed=3)
    out = adapt_pretrained(pre, random_model(dataclasses.replace(cfg, image_size=32), seed=2))
    assert out.pos_embed is None and out.cfg.image_size == 32
    np.testing.assert_array_equal(np.asarray(out.norm.weight), np.asarray(pre.norm.weight))


def test_mapped_head_reproduces_pretrained_logits(pretrained):
    target = random_model(dataclasses.replace(SMALL, labels=5, droppath=0.1), seed=5)
    out = adapt_pretrained(pretrained, target, {"src": [3, 7, 11], "dst": [0, 1, 2]})
    assert out.cfg.labels == 5 and out.cfg.droppath == 0.1
    x = images(6, 16)
    got, ref = np.asarray(deit.predict(out, x)), np.asarray(deit.predict(pretrained, x))
    np.testing.assert_allclose(got[:, :3], ref[:, [3, 7, 11]], rtol=1e-5, atol=1e-5)
    assert (got[:, 3:] == -10.0).all()
    assert (np.asarray(out.head.weight)[3:] == 0).all()


def test_label_mismatch_without_mapping_keeps_fresh_head(pretrained):
    target = random_model(dataclasses.replace(SMALL, labels=5), seed=5)
    out = adapt_pretrained(pretrained, target)
    np.testing.assert_array_equal(np.asarray(out.head.weight), np.asarray(target.head.weight))
    np.testing.assert_array_equal(np.asarray(out.head.bias), np.asarray(target.head.bias))
    np.testing.assert_array_equal(np.asarray(out.cls_token), np.asarray(pretrained.cls_token))


def test_gelu_comes_from_target(pretrained):
    tanh = pretrained.with_options(gelu="tanh")  # as a deit3-jax .msgpack loads
    out = adapt_pretrained(tanh, random_model(SMALL, seed=5))
    assert out.cfg.gelu == "exact"


@pytest.mark.parametrize("field,value", [("dim", 64), ("layers", 3), ("heads", 4), ("patch_size", 8),
                                         ("layerscale", False), ("pooling", "gap")])
def test_architecture_mismatch_names_the_field(pretrained, field, value):
    target = skeleton(dataclasses.replace(SMALL, **{field: value}))
    with pytest.raises(ValueError, match=rf"pretrained {field}={getattr(SMALL, field)!r} but target {field}={value!r}"):
        adapt_pretrained(pretrained, target)


def test_bad_mapping_index_is_named(pretrained, tmp_path):
    target = random_model(dataclasses.replace(SMALL, labels=5), seed=5)
    with pytest.raises(ValueError, match=r"src\[1\] = 20 is not an int in \[0, 20\)"):
        adapt_pretrained(pretrained, target, {"src": [3, 20], "dst": [0, 1]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"src": [1, 2, 3], "dst": [0, 1, 9]}))
    with pytest.raises(ValueError, match=rf"{bad}: dst\[2\] = 9 is not an int in \[0, 5\)"):
        load_label_mapping(bad, dst_labels=5)
    bad.write_text(json.dumps({"src": [1, 2], "dst": [0]}))
    with pytest.raises(ValueError, match="'src' has 2 entries but 'dst' has 1"):
        load_label_mapping(bad)
    with pytest.raises(ValueError, match="no such file"):
        load_label_mapping("nope.json")


def test_real_in21k_to_in1k_mapping():
    m = load_label_mapping("in21k_to_in1k.json", src_labels=19167, dst_labels=1000)  # found in recipes/label_maps
    assert len(m["src"]) == len(m["dst"]) == 999
    assert len(set(m["dst"])) == 999 and max(m["src"]) < 19167
    # The in21k fine-tune recipes point at it by bare name and pretrain heads of 19167 labels.
    assert recipes.load("deit3-s16-pt-224-in21k-90ep").model.labels == 19167
    assert recipes.load("deit3-s16-pt-224-in21k-90ep-ft-224-in1k-50ep").data.label_mapping == "in21k_to_in1k.json"


def tiny_cfg(ckpt: Path, **model) -> Config:
    base = from_flat(json.loads((ROOT / "recipes" / "tiny-digits.json").read_text()))
    # Patch 4, learnable positions and a cls token, as the checkpoints here: their pos_embed gets resized.
    model = dict(layers=2, dim=32, heads=2, patch_size=4, posemb="learnable", pooling="cls", **model)
    return dataclasses.replace(base, model=dataclasses.replace(base.model, **model), pretrained_ckpt=str(ckpt))


def deit3_jax_msgpack(cfg: ModelConfig, path: Path) -> None:
    """Random deit3-jax params in flax's msgpack format (ndarrays as ext type 1)."""
    rng, tree = np.random.default_rng(7), {}
    for key, shape in deit3_jax_shapes(cfg).items():
        *parents, leaf = ("model." + key).split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = rng.normal(0, 0.1, shape).astype(np.float32)
    path.write_bytes(flax_msgpack_bytes(tree))


def test_load_pretrained_from_deit3_jax_with_mapping(tmp_path):
    """The in21k -> in1k path in miniature: .msgpack (tanh GELU), bare mapping file name, new size."""
    src_cfg = dataclasses.replace(SMALL, gelu="tanh")
    deit3_jax_msgpack(src_cfg, tmp_path / "pre.msgpack")
    (tmp_path / "map.json").write_text(json.dumps({"src": [3, 7, 11], "dst": [0, 1, 2]}))
    target_cfg = dataclasses.replace(SMALL, labels=5, image_size=24)
    cfg = Config(model=target_cfg, pretrained_ckpt=str(tmp_path / "pre.msgpack"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_mapping=str(tmp_path / "map.json")))
    out = load_pretrained(cfg, random_model(target_cfg, seed=5))
    pre = deit.load_model(tmp_path / "pre.msgpack")
    assert pre.cfg.gelu == "tanh" and out.cfg == target_cfg  # the recipe's GELU ('exact') wins
    np.testing.assert_array_equal(np.asarray(out.head.weight)[:3], np.asarray(pre.head.weight)[[3, 7, 11]])
    np.testing.assert_array_equal(np.asarray(out.blocks.mlp.fc1.weight), np.asarray(pre.blocks.mlp.fc1.weight))
    assert out.pos_embed.shape == (36, 32)
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_mapping="in21k_to_in1k.json"))
    with pytest.raises(ValueError, match=r"in21k_to_in1k.json: src\[0\] = 359 is not an int in \[0, 20\)"):
        load_pretrained(bad, random_model(target_cfg, seed=5))


def test_create_state_starts_from_the_checkpoint(tmp_path):
    from deit.steps import create_state

    pre = random_model(dataclasses.replace(SMALL, labels=20, layerscale=False), seed=4)
    ckpt = deit.save_model(pre, tmp_path / "pre.safetensors")
    cfg = tiny_cfg(ckpt)  # image 32 (grid 8), 10 labels from a 16 px (grid 4), 20-label checkpoint
    mesh = sharding.make_mesh(2)
    opt = optim.build(cfg, skeleton(cfg.model))
    state, shardings = create_state(cfg, mesh, opt.tx)
    np.testing.assert_array_equal(np.asarray(state.model.blocks.attn.qkv.weight), np.asarray(pre.blocks.attn.qkv.weight))
    head = np.asarray(state.model.head.weight)  # re-initialised (trunc normal 0.02), not pretrained (0.1)
    assert head.shape == (10, 32) and 0.01 < head.std() < 0.03
    assert state.model.pos_embed.shape == (64, 32)
    for leaf, s in zip(jax.tree.leaves(eqx.filter(state, eqx.is_array)), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == s
    assert int(state.step) == 0


def test_train_cli_fine_tunes_from_checkpoint(tmp_path):
    pre = random_model(dataclasses.replace(SMALL, labels=10, layerscale=False), seed=4)
    ckpt = deit.save_model(pre, tmp_path / "pre.safetensors")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "src/train.py", "recipes:tiny-digits", "--training-steps", "1",
                        "--eval-interval", "1", "--layers", "2", "--dim", "32", "--heads", "2",
                        "--patch-size", "4", "--posemb", "learnable", "--pooling", "cls", "--train-batch-size", "16",
                        "--random-crop", "none", "--no-progress",
                        "--learning-rate", "0",  # the one step moves weights by ~1e-6 (warmup starts at 1e-6)
                        "--pretrained-ckpt", str(ckpt), "--output-dir", str(out)],
                       cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", "DEIT_CACHE": str(tmp_path / "cache")},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "results.json").read_text())["step"] == 1
    tuned = deit.load_model(out / "checkpoints" / "last")
    assert tuned.cfg.image_size == 32 and tuned.pos_embed.shape == (64, 32)
    np.testing.assert_allclose(np.asarray(tuned.blocks.attn.qkv.weight), np.asarray(pre.blocks.attn.qkv.weight), atol=1e-4)
    np.testing.assert_allclose(np.asarray(tuned.pos_embed), np.asarray(resize_pos_embed(pre.pos_embed, 8)), atol=1e-4)


def test_find_pretrained_takes_the_file_or_our_run(tmp_path):
    from deit.finetune import find_pretrained

    msgpack_path = tmp_path / "deit3-b16-pt-192-in1k-400ep-last.msgpack"
    with pytest.raises(ValueError, match=r"no such file nor our run's checkpoint .*deit3-b16-pt-192-in1k-400ep/checkpoints/last"):
        find_pretrained(str(msgpack_path))
    with pytest.raises(ValueError, match=r"pretrained_ckpt='.*w\.safetensors': no such file;"):
        find_pretrained(str(tmp_path / "w.safetensors"))
    run = tmp_path / "deit3-b16-pt-192-in1k-400ep" / "checkpoints" / "last"
    run.mkdir(parents=True)
    deit.save_model(deit.init_model(SMALL), run / "model.safetensors")
    assert find_pretrained(str(msgpack_path)) == str(run)  # our own run, by deit3-jax's file name
    msgpack_path.write_bytes(b"x")
    assert find_pretrained(str(msgpack_path)) == str(msgpack_path)  # a published .msgpack wins


def test_finetune_recipe_without_its_pretraining_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GCS_MODEL_DIR"}
    r = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "recipes:deit3-s16-pt-224-in21k-90ep-ft-224-in1k-50ep",
                        "--train-dataset-shards", "digits:train", "--valid-dataset-shards", "digits:valid",
                        "--output-dir", str(tmp_path / "o")], cwd=tmp_path,
                       env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1
    assert "outputs/deit3-s16-pt-224-in21k-90ep-last.msgpack" in r.stderr and "checkpoints/last" in r.stderr
    assert not (tmp_path / "o").exists()
