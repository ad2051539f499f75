"""Weights interop: timm parity and round trips, deit3-jax msgpack against an independent numpy
forward pass, our self-describing safetensors, and the convert CLI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file
from skimage import data as skdata

import deit
from deit.config import ModelConfig
from deit.deit3_jax_weights import from_deit3_jax, read_flax_msgpack
from deit.interop import load_model, save_model
from deit.timm_weights import from_timm, infer_timm_config, to_timm
from deit.model import IMAGENET_MEAN, IMAGENET_STD, init_model, preset
from deit3_jax_tree import deit3_jax_params, flax_msgpack_bytes

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# ----------------------------------------------------------------------------- fixtures

def photos(size: int, extra_random: int = 2) -> np.ndarray:
    """Real photographs (astronaut, coffee) resized with PIL, plus random uint8 images."""
    imgs = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in (skdata.astronaut(), skdata.coffee())]
    rand = np.random.default_rng(0).integers(0, 256, (extra_random, size, size, 3), dtype=np.uint8)
    return np.concatenate([np.stack(imgs), rand]).astype(np.uint8)


def timm_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values for EVERY parameter (norms, LayerScale, tokens, positions, head included)."""
    g = torch.Generator().manual_seed(seed)

    def rand(p):
        return torch.randn(p.shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * rand(p))
            elif name.endswith("gamma"):
                p.copy_(0.5 * rand(p))
            elif name.endswith("weight"):
                p.copy_(rand(p) / np.sqrt(np.prod(p.shape[1:])))  # unit-variance outputs
            else:  # biases, cls/dist tokens, pos_embed
                p.copy_(0.3 * rand(p))
    return model.eval()


def timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(timm_input(images)).numpy()


@pytest.fixture(scope="module")
def images224():
    return photos(224)


@pytest.fixture(scope="module")
def timm_models():
    names = ["deit3_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]
    return {n: randomise(timm.create_model(n, pretrained=False), seed=i) for i, n in enumerate(names)}


def tiny_timm(**kw) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                no_embed_class=True, init_values=0.1)
    return randomise(VisionTransformer(**{**args, **kw}), seed=7)


# ----------------------------------------------------------------------------- timm

@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_parity(name, timm_models, images224):
    ref_model = timm_models[name]
    model = from_timm(ref_model.state_dict())
    ref = timm_logits(ref_model, images224)
    ours = np.asarray(deit.predict(model, images224))
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: max |logit diff| {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero outputs
    assert diff <= TOL
    assert model.cfg.distilled == ("distilled" in name)
    assert model.cfg.layerscale == name.startswith("deit3")


def test_inferred_config_matches_presets(timm_models):
    cfg = infer_timm_config(timm_models["deit3_small_patch16_224"].state_dict())
    assert cfg == preset("s16", layerscale=True, labels=1000, layerscale_init=cfg.layerscale_init)
    cfg = infer_timm_config(timm_models["deit_tiny_distilled_patch16_224"].state_dict())
    assert cfg == preset("ti16", distilled=True, labels=1000)


def test_timm_round_trip_deit3_is_bitwise(timm_models):
    sd = {k: v.numpy() for k, v in timm_models["deit3_small_patch16_224"].state_dict().items()}
    back = to_timm(from_timm(sd), layout="deit3")
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_round_trip_vit_layout(name, timm_models, images224):
    ref_model = timm_models[name]
    sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    p = 1 + ("dist_token" in sd)
    back = to_timm(from_timm(sd), layout="vit")
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k not in ("pos_embed", "cls_token", "dist_token"):
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    # The constant prefix positions were folded into the tokens; patch positions are untouched.
    np.testing.assert_array_equal(back["pos_embed"][:, p:], sd["pos_embed"][:, p:])
    assert not back["pos_embed"][:, :p].any()
    np.testing.assert_array_equal(back["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    if p == 2:
        np.testing.assert_array_equal(back["dist_token"], sd["dist_token"] + sd["pos_embed"][:, 1:2])
    # timm computes exactly the same logits from the exported dict.
    other = timm.create_model(name, pretrained=False).eval()
    other.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    np.testing.assert_allclose(timm_logits(other, images224[:2]), timm_logits(ref_model, images224[:2]), atol=1e-6)


def test_deit3_exported_in_vit_layout_loads_into_timm_vit():
    # deit3-jax's README recipe: a LayerScale model in a plain timm vit (pos_embed with a cls row).
    from timm.models.vision_transformer import VisionTransformer

    ref = tiny_timm()
    images = photos(16)
    model = from_timm(ref.state_dict(), heads=4)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                            init_values=0.1).eval()
    vit.load_state_dict({k: torch.from_numpy(v) for k, v in to_timm(model, layout="vit").items()})
    np.testing.assert_allclose(timm_logits(vit, images), timm_logits(ref, images), atol=1e-5)


def test_fb_names_wrappers_and_gap():
    ref = tiny_timm()
    images = photos(16)
    fb = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in ref.state_dict().items()}
    for wrapped in ({"model": fb}, {"state_dict": fb}, fb):
        m = from_timm(wrapped, heads=4)
        np.testing.assert_allclose(np.asarray(deit.predict(m, images)), timm_logits(ref, images), atol=TOL)
    # Global average pooling, no cls token (timm class_token=False, global_pool='avg').
    gap = tiny_timm(class_token=False, global_pool="avg", fc_norm=False, init_values=None)
    m = from_timm(gap.state_dict(), heads=4)
    assert m.cfg.pooling == "gap" and m.cls_token is None and not m.cfg.layerscale
    np.testing.assert_allclose(np.asarray(deit.predict(m, images)), timm_logits(gap, images), atol=TOL)


def test_timm_errors_name_the_key():
    sd = {k: v.numpy() for k, v in tiny_timm().state_dict().items()}
    cfg = infer_timm_config(sd, heads=4)
    bad = dict(sd, **{"blocks.1.attn.qkv.weight": np.zeros((96, 31), np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight has shape \(96, 31\), expected \(96, 32\)"):
        from_timm(bad, cfg)
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 20, 32\), expected \(1, 16, 32\)"):
        from_timm(dict(sd, pos_embed=np.zeros((1, 20, 32), np.float32)), cfg)
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.0\.norm1\.bias'\]"):
        from_timm({k: v for k, v in sd.items() if k != "blocks.0.norm1.bias"}, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \['fc_norm\.weight'\]"):
        from_timm(dict(sd, **{"fc_norm.weight": np.ones(32, np.float32)}), cfg)
    with pytest.raises(ValueError, match="heads"):
        from_timm(sd)  # dim 32 is no standard width
    with pytest.raises(ValueError, match="head.weight has shape"):
        from_timm(sd, dataclasses.replace(cfg, labels=5))
    msg = ""
    try:
        from_timm(bad, cfg)
    except ValueError as e:
        msg = str(e)
    assert "\n" not in msg


# ----------------------------------------------------------------------------- deit3-jax msgpack

def numpy_deit3_jax_forward(params: dict, images: np.ndarray, patch: int) -> np.ndarray:
    """deit3-jax's flax ViT re-derived in float64 numpy: conv kernel (P,P,3,D), DenseGeneral
    einsums over (heads, head_dim), tanh GELU, LayerNorm eps 1e-6, posemb on patches only."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["model"])
    x = (images.astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    b, h, w_, _ = x.shape
    gh, gw = h // patch, w_ // patch
    patches = x.reshape(b, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijpqc,pqcd->bijd", patches, p["embed"]["wte"]["kernel"]) + p["embed"]["wte"]["bias"]
    d = x.shape[-1]
    if "wpe" in p["embed"]:
        pos = p["embed"]["wpe"]
    else:  # deit3-jax: [sin(x), cos(x), sin(y), cos(y)], x the column (along the width), y the row
        omega = 1.0 / 10000 ** np.linspace(0, 1, d // 4)
        cx = np.broadcast_to(np.arange(gw)[None, :, None] * omega, (gh, gw, d // 4))
        ry = np.broadcast_to(np.arange(gh)[:, None, None] * omega, (gh, gw, d // 4))
        pos = np.concatenate([np.sin(cx), np.cos(cx), np.sin(ry), np.cos(ry)], -1)
    x = (x + pos).reshape(b, gh * gw, d)
    if "cls_token" in p["embed"]:
        x = np.concatenate([np.broadcast_to(p["embed"]["cls_token"], (b, 1, d)), x], 1)

    def ln(v, n):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * n["scale"] + n["bias"]

    def dense(v, layer):
        return np.einsum("btd,dhk->bthk", v, layer["kernel"]) + layer["bias"]

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    i = 0
    while f"layer_{i}" in p:
        lp = p[f"layer_{i}"]
        a = lp["attn"]
        y = ln(x, lp["norm1"])
        q, k, v = dense(y, a["wq"]), dense(y, a["wk"]), dense(y, a["wv"])
        s = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        z = np.einsum("bhqk,bkhd->bqhd", s, v)
        y = np.einsum("bqhd,hdo->bqo", z, a["wo"]["kernel"]) + a["wo"]["bias"]
        x = x + lp.get("scale1", 1.0) * y
        y = ln(x, lp["norm2"])
        y = gelu_tanh(y @ lp["ff"]["w1"]["kernel"] + lp["ff"]["w1"]["bias"]) @ lp["ff"]["w2"]["kernel"] + lp["ff"]["w2"]["bias"]
        x = x + lp.get("scale2", 1.0) * y
        i += 1
    x = ln(x, p["norm"])
    pooled = x[:, 0] if "cls_token" in p["embed"] else x.mean(1)
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("variant", [dict(), dict(learnable=False, cls=False, layerscale=False)],
                         ids=["learnable-cls-layerscale", "sincos2d-gap"])
def test_deit3_jax_msgpack_matches_numpy_forward(variant, tmp_path):
    params = deit3_jax_params(np.random.default_rng(1), **variant)
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(flax_msgpack_bytes(params))
    # A sincos2d file records no image size: it loads without one and predicts at any size.
    model = load_model(path)
    cfg = model.cfg
    assert (cfg.layers, cfg.dim, cfg.heads, cfg.patch_size, cfg.labels) == (2, 32, 4, 4, 10)
    assert cfg.image_size == (16 if variant == {} else 224)
    assert cfg.gelu == "tanh"
    assert cfg.posemb == ("learnable" if variant == {} else "sincos2d")
    assert cfg.pooling == ("cls" if variant == {} else "gap")
    assert cfg.layerscale == (variant == {})
    for size in (16,) if variant == {} else (16, 24):
        images = photos(size)
        ref = numpy_deit3_jax_forward(params, images, patch=4)
        diff = float(np.abs(np.asarray(deit.predict(model, images)) - ref).max())
        print(f"deit3-jax {variant} at {size}: max |logit diff| {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
        assert np.abs(ref).max() > 1.0
        assert diff <= TOL
    # The decoder alone gives back the arrays bit for bit, and the tree (already decoded) loads too.
    tree = read_flax_msgpack(path.read_bytes())
    np.testing.assert_array_equal(tree["model"]["layer_1"]["ff"]["w2"]["kernel"], params["model"]["layer_1"]["ff"]["w2"]["kernel"])
    again = from_deit3_jax(tree, image_size=16)
    np.testing.assert_array_equal(np.asarray(again.blocks.attn.qkv.weight), np.asarray(model.blocks.attn.qkv.weight))


def test_deit3_jax_errors(tmp_path):
    params = deit3_jax_params(np.random.default_rng(2))
    params["model"]["layer_1"]["ff"]["w1"]["kernel"] = np.zeros((32, 100), np.float32)
    with pytest.raises(ValueError, match=r"layer_1\.ff\.w1\.kernel has shape \(32, 100\), expected \(32, 128\)"):
        from_deit3_jax(params)
    # Complex numbers (flax ext code 2) and unknown ext codes are refused with a clear message.
    blob = msgpack.packb({"model": {"x": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}}, use_bin_type=True)
    with pytest.raises(ValueError, match="complex"):
        read_flax_msgpack(blob)
    blob = msgpack.packb({"model": {"x": msgpack.ExtType(9, b"")}}, use_bin_type=True)
    path = tmp_path / "bad.msgpack"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=r"bad\.msgpack.*ext type code 9"):
        load_model(path)


# ----------------------------------------------------------------------------- files and CLI

def leaves_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("cfg_kw", [dict(layerscale=True), dict(distilled=True), dict(posemb="sincos2d", pooling="gap", gelu="tanh")])
def test_safetensors_self_describing(cfg_kw, tmp_path):
    cfg = ModelConfig(layers=2, dim=32, heads=4, labels=10, patch_size=4, image_size=16, **cfg_kw)
    model = init_model(cfg, seed=3)
    path = save_model(model, tmp_path / "w.safetensors")
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["deit.format"] == "1" and ModelConfig.from_dict(json.loads(meta["deit.config"])) == cfg
    back = load_model(path)
    assert back.cfg == cfg
    leaves_equal(model, back)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp files left behind
    # A checkpoint directory holds model.safetensors.
    save_model(model, tmp_path)
    assert load_model(tmp_path).cfg == cfg


def test_load_timm_files_and_bad_paths(tmp_path):
    ref = tiny_timm()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    images = photos(16)
    save_file(sd, str(tmp_path / "timm.safetensors"))  # timm's own safetensors: no config metadata
    torch.save({"model": ref.state_dict()}, tmp_path / "timm.pth")
    for name in ("timm.safetensors", "timm.pth"):
        m = load_model(tmp_path / name, heads=4)
        np.testing.assert_allclose(np.asarray(deit.predict(m, images)), timm_logits(ref, images), atol=TOL)
    with pytest.raises(ValueError, match=r"weights\.npz.*allowed"):
        (tmp_path / "weights.npz").write_bytes(b"")
        load_model(tmp_path / "weights.npz")
    with pytest.raises(ValueError, match=r"nothere\.safetensors.*no such file"):
        load_model(tmp_path / "nothere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        load_model(tmp_path / "junk.safetensors")


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src" / "convert.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)


def test_convert_cli_round_trip_and_bad_input(tmp_path):
    cfg = ModelConfig(layers=2, dim=192, heads=3, labels=10, patch_size=4, image_size=16, distilled=True)
    model = init_model(cfg, seed=5)
    src = save_model(model, tmp_path / "a.safetensors")
    r = run_convert(str(src), str(tmp_path / "b.pth"), "--layout", "vit")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    assert sd["pos_embed"].shape == (1, 16 + 2, 192)  # vit layout: cls and dist rows
    r = run_convert(str(tmp_path / "b.pth"), str(tmp_path / "c.safetensors"))
    assert r.returncode == 0, r.stderr
    back = load_model(tmp_path / "c.safetensors")
    assert back.cfg == cfg  # timm files carry no config: inferred (dim 192 -> 3 heads)
    images = photos(16)
    np.testing.assert_array_equal(np.asarray(deit.predict(back, images)), np.asarray(deit.predict(model, images)))
    # Bad input: one line on stderr, exit status 2, no output file.
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    r = run_convert(str(tmp_path / "junk.pth"), str(tmp_path / "out.safetensors"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "junk.pth" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
