"""Ten training steps through the real jitted train step against deit3-jax's update rule.

The reference is independent of our code: it holds the weights in deit3-jax's own layout
(separate q/k/v kernels (D, heads, head_dim), conv kernel (P, P, 3, D), flax LayerNorm, tanh
GELU), takes float64 gradients of a jax.numpy forward written in that layout, and applies
deit3-jax's optimiser (optax warmup-cosine at count = step, clip by global norm, Adam, decoupled
weight decay on `kernel` leaves, LAMB's per-tensor trust ratio, -lr, layer-wise lr decay) in
float64 numpy. Our step starts from the same weights, loaded from a deit3-jax .msgpack file,
and runs in float32 with augmentation off on one fixed batch.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deit
from deit import optim
from deit.config import from_flat
from deit.steps import init_state, make_train_step
from deit3_jax_tree import deit3_jax_params, flax_msgpack_bytes

LAYERS, DIM, HEADS, PATCH, IMAGE, LABELS, BATCH, STEPS = 2, 32, 4, 4, 16, 10, 8, 10
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

NO_AUGMENT = dict(random_crop="none", hflip=0.0, color_jitter=0.0, auto_augment="none", random_erasing=0.0,
                  mixup=0.0, cutmix=0.0, dropout=0.0, droppath=0.0)
CASES = {
    "lamb-clip-bce-layerscale-cls": dict(
        optimizer="lamb", learning_rate=1e-2, weight_decay=0.05, clip_grad=1.0, warmup_steps=3,
        training_steps=STEPS, criterion="bce", label_smoothing=0.0, lr_decay=1.0),
    "adamw-ce-smoothing-lrdecay-gap": dict(
        optimizer="adamw", learning_rate=2e-3, weight_decay=0.05, clip_grad=0.0, warmup_steps=2,
        training_steps=STEPS, criterion="ce", label_smoothing=0.1, lr_decay=0.75),
}
POOLING = {"lamb-clip-bce-layerscale-cls": "cls", "adamw-ce-smoothing-lrdecay-gap": "gap"}


# ----------------------------------------------------------------------------- deit3-jax weights

def deit3_tree(rng: np.random.Generator, pooling: str, layerscale: bool) -> dict:
    """A random deit3-jax parameter tree (float32), every leaf non-trivial. q, k and v kernels get
    different scales, as trained ones have: one fused trust ratio for them would show; the head's
    gain makes the grad norm exceed clip_grad."""
    return deit3_jax_params(rng, layers=LAYERS, dim=DIM, heads=HEADS, patch=PATCH, image=IMAGE, labels=LABELS,
                            layerscale=layerscale, cls=pooling == "cls", bias_scale=0.1, token_scale=0.3,
                            qkv_gains=(1.0, 2.5, 0.5), head_gain=3.0)


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)}
    return out


def as_deit3(model: deit.ViT) -> dict[str, np.ndarray]:
    """Our weights under deit3-jax's names and layouts (the qkv rows are [q | k | v] x heads x
    head_dim, our Linear weights [out, in], flax kernels [in, out])."""
    hd = DIM // HEADS
    a = lambda x: np.asarray(x, np.float64)
    out = {"model.embed.wte.kernel": a(model.patch_embed.weight).transpose(2, 3, 1, 0),  # (D,3,P,P) -> (P,P,3,D)
           "model.embed.wte.bias": a(model.patch_embed.bias),
           "model.embed.wpe": a(model.pos_embed).reshape(IMAGE // PATCH, IMAGE // PATCH, DIM),
           "model.norm.scale": a(model.norm.weight), "model.norm.bias": a(model.norm.bias),
           "model.head.kernel": a(model.head.weight).T, "model.head.bias": a(model.head.bias)}
    if model.cls_token is not None:
        out["model.embed.cls_token"] = a(model.cls_token)
    blk = model.blocks
    for i in range(LAYERS):
        p = f"model.layer_{i}."
        qkv_w, qkv_b = a(blk.attn.qkv.weight[i]).T, a(blk.attn.qkv.bias[i])  # (D, 3D), (3D,)
        for j, n in enumerate(("wq", "wk", "wv")):
            out[f"{p}attn.{n}.kernel"] = qkv_w[:, j * DIM:(j + 1) * DIM].reshape(DIM, HEADS, hd)
            out[f"{p}attn.{n}.bias"] = qkv_b[j * DIM:(j + 1) * DIM].reshape(HEADS, hd)
        out[f"{p}attn.wo.kernel"] = a(blk.attn.proj.weight[i]).T.reshape(HEADS, hd, DIM)
        out[f"{p}attn.wo.bias"] = a(blk.attn.proj.bias[i])
        for k, fc in ((1, blk.mlp.fc1), (2, blk.mlp.fc2)):
            out[f"{p}ff.w{k}.kernel"], out[f"{p}ff.w{k}.bias"] = a(fc.weight[i]).T, a(fc.bias[i])
        for k, n in ((1, blk.norm1), (2, blk.norm2)):
            out[f"{p}norm{k}.scale"], out[f"{p}norm{k}.bias"] = a(n.weight[i]), a(n.bias[i])
        if blk.ls1 is not None:
            out[f"{p}scale1"], out[f"{p}scale2"] = a(blk.ls1.gamma[i]), a(blk.ls2.gamma[i])
    return out


# ----------------------------------------------------------------------------- deit3-jax reference

def ref_logits(p: dict, x: jax.Array) -> jax.Array:
    """deit3-jax's flax ViT in jax.numpy on its own parameter layout (float64 under enable_x64)."""
    b = x.shape[0]
    g = IMAGE // PATCH
    patches = x.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    e = p["embed"]
    h = jnp.einsum("bijpqc,pqcd->bijd", patches, e["wte"]["kernel"]) + e["wte"]["bias"]
    h = (h + e["wpe"]).reshape(b, g * g, DIM)  # position embedding on patches only
    if "cls_token" in e:
        h = jnp.concatenate([jnp.broadcast_to(e["cls_token"], (b, 1, DIM)), h], 1)

    def ln(v, n):  # flax LayerNorm, eps 1e-6
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / jnp.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * n["scale"] + n["bias"]

    def gelu_tanh(v):  # flax's nn.gelu default
        return 0.5 * v * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    for i in range(LAYERS):
        lp, a = p[f"layer_{i}"], p[f"layer_{i}"]["attn"]
        y = ln(h, lp["norm1"])
        q, k, v = (jnp.einsum("btd,dhk->bthk", y, a[n]["kernel"]) + a[n]["bias"] for n in ("wq", "wk", "wv"))
        s = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / math.sqrt(DIM // HEADS), k), -1)
        z = jnp.einsum("bhqk,bkhd->bqhd", s, v)
        h = h + lp.get("scale1", 1.0) * (jnp.einsum("bqhd,hdo->bqo", z, a["wo"]["kernel"]) + a["wo"]["bias"])
        y = ln(h, lp["norm2"])
        f = lp["ff"]
        y = gelu_tanh(y @ f["w1"]["kernel"] + f["w1"]["bias"]) @ f["w2"]["kernel"] + f["w2"]["bias"]
        h = h + lp.get("scale2", 1.0) * y
    h = ln(h, p["norm"])
    pooled = h[:, 0] if "cls_token" in e else h.mean(1)
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


def ref_loss(tree: dict, x: jax.Array, labels: np.ndarray, criterion: str, smoothing: float) -> jax.Array:
    """deit3-jax's TrainModule at det=False without mixup: one-hot, smoothed for ce only."""
    logits = ref_logits(tree["model"], x)
    t = jax.nn.one_hot(labels, LABELS, dtype=logits.dtype)
    if criterion == "ce":
        t = (1 - smoothing) * t + smoothing / LABELS
        return -(t * jax.nn.log_softmax(logits, -1)).sum(-1).mean()
    y = (t > 0).astype(logits.dtype)  # sigmoid BCE against targets > 0, mean over classes
    return (jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))).mean(-1).mean()


def ref_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """optax.warmup_cosine_decay_schedule(1e-6, peak, warmup, decay_steps=total, end 1e-5)."""
    if step < warmup:
        return 1e-6 + (peak - 1e-6) * step / warmup
    frac = min(step - warmup, total - warmup) / (total - warmup)
    return 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * frac))


def layer_scale(name: str, decay: float) -> float:
    """deit3-jax's layer index: embed 0, layer_i i + 1, the rest L; lr scale decay ** (L - index)."""
    part = name.split(".")[1]
    index = 0 if part == "embed" else int(part[len("layer_"):]) + 1 if part.startswith("layer_") else LAYERS
    return decay ** (LAYERS - index)


def reference_run(init: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, c: dict
                  ) -> tuple[list[float], dict[str, np.ndarray], list[float]]:
    """(losses, final weights, gradient norms) of deit3-jax's training on a fixed batch, float64."""
    names = sorted(init)

    def unflatten(values):
        tree: dict = {}
        for n, v in zip(names, values):
            d = tree
            *parents, leaf = n.split(".")
            for q in parents:
                d = d.setdefault(q, {})
            d[leaf] = v
        return tree

    with jax.enable_x64(True):
        x = jnp.asarray((images.astype(np.float64) / 255.0 - MEAN) / STD)
        grad_fn = jax.jit(jax.value_and_grad(
            lambda vals: ref_loss(unflatten(vals), x, labels, c["criterion"], c["label_smoothing"])))
        p = {n: init[n].astype(np.float64) for n in names}
        m = {n: np.zeros_like(v) for n, v in p.items()}
        v2 = {n: np.zeros_like(v) for n, v in p.items()}
        b1, b2, eps = 0.9, 0.999, 1e-8
        losses, gnorms = [], []
        for step in range(STEPS):
            loss, g = grad_fn([jnp.asarray(p[n]) for n in names])
            g = {n: np.asarray(a, np.float64) for n, a in zip(names, g)}
            losses.append(float(loss))
            gnorm = math.sqrt(sum(float((a**2).sum()) for a in g.values()))
            gnorms.append(gnorm)
            if c["clip_grad"] > 0 and gnorm > c["clip_grad"]:
                g = {n: a * c["clip_grad"] / gnorm for n, a in g.items()}
            lr = ref_lr(step, c["learning_rate"], c["warmup_steps"], c["training_steps"])
            t = step + 1  # Adam's count: every update here is finite
            for n in names:
                m[n] = b1 * m[n] + (1 - b1) * g[n]
                v2[n] = b2 * v2[n] + (1 - b2) * g[n] ** 2
                u = (m[n] / (1 - b1**t)) / (np.sqrt(v2[n] / (1 - b2**t)) + eps)
                kernel = n.endswith(".kernel")
                if kernel:
                    u = u + c["weight_decay"] * p[n]
                if kernel and c["optimizer"] == "lamb":  # one ratio per kernel tensor
                    pn, un = np.linalg.norm(p[n]), np.linalg.norm(u)
                    u = u * (pn / un if pn > 0 and un > 0 else 1.0)
                p[n] = p[n] - lr * u * layer_scale(n, c["lr_decay"])
    return losses, p, gnorms


# ----------------------------------------------------------------------------- ours

def our_run(path, images: np.ndarray, labels: np.ndarray, c: dict) -> tuple[list[float], deit.ViT, list[float]]:
    model = deit.load_model(path)
    assert model.cfg.gelu == "tanh" and model.cfg.pooling in ("cls", "gap")
    flags = {**NO_AUGMENT, **c, "train_batch_size": BATCH}
    cfg = from_flat(flags)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(model.cfg, dropout=0.0, droppath=0.0))
    opt = optim.build(cfg, model)
    # Created under jit, as the trainer does: fresh buffers for every leaf (the step donates them).
    state = eqx.filter_jit(init_state)(model, opt.tx)
    step = make_train_step(cfg, opt.tx, opt.schedule)
    losses, gnorms = [], []
    for _ in range(STEPS):
        state, metrics = step(state, jnp.asarray(images), jnp.asarray(labels))
        assert float(metrics["skipped"]) == 0
        losses.append(float(metrics["loss"]))
        gnorms.append(float(metrics["grad_norm"]))
    return losses, state.model, gnorms


def trajectory_errors(case: str, tmp_path) -> tuple[float, dict[str, float], dict[str, float], list[float]]:
    """(max relative loss difference over the steps, per tensor weight error relative to the
    total update in norm and in max form, the reference's gradient norms)."""
    c = CASES[case]
    rng = np.random.default_rng(0)
    tree = deit3_tree(rng, POOLING[case], layerscale=c["optimizer"] == "lamb")
    path = tmp_path / "init.msgpack"
    path.write_bytes(flax_msgpack_bytes(tree))
    images = rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), dtype=np.uint8)
    labels = (np.arange(BATCH) * 3 % LABELS).astype(np.int32)

    init = {n: v.astype(np.float64) for n, v in flat(tree).items()}
    ref_losses, ref_final, ref_gnorms = reference_run(init, images, labels, c)
    losses, model, gnorms = our_run(path, images, labels, c)
    ours = as_deit3(model)
    assert set(ours) == set(init)
    loss_err = float(np.max(np.abs(np.array(losses) - ref_losses) / np.abs(ref_losses)))
    np.testing.assert_allclose(gnorms, ref_gnorms, rtol=1e-3)  # the clip trigger sees the same norms
    # The key bias adds q . b_k to all logits of a query's row, which softmax ignores: its true
    # gradient is 0 and the float64 reference leaves it in place, while float32 rounding noise
    # (in deit3-jax's float32 step as in ours) becomes an O(lr) walk under Adam's normalisation.
    # It changes no output, so it is checked to be that null direction instead of compared.
    null = {n for n in init if n.endswith("attn.wk.bias")}
    for n in null:
        assert np.abs(ref_final[n] - init[n]).max() <= 1e-9
    # Per tensor, ||ours - ref|| / ||ref - init||: the norm form of "within 1e-3 of the update".
    # The elementwise max form is printed too; it is not asserted, as an element whose gradient
    # sits near 0 can carry float32 noise through Adam's normalisation (measured: at most a few
    # 1e-3 on single elements, 1e-5 typical).
    rel = lambda d, n: float(d(ours[n] - ref_final[n]) / d(ref_final[n] - init[n]))
    names = sorted(set(init) - null)
    weight_err = {n: rel(np.linalg.norm, n) for n in names}
    max_err = {n: rel(lambda a: np.abs(a).max(), n) for n in names}
    return loss_err, weight_err, max_err, ref_gnorms


@pytest.mark.parametrize("case", list(CASES))
def test_ten_steps_match_deit3_jax(case, tmp_path):
    loss_err, weight_err, max_err, gnorms = trajectory_errors(case, tmp_path)
    worst = max(weight_err, key=weight_err.get)
    print(f"{case}: max rel loss diff {loss_err:.2e}; weight diff / update: norm {weight_err[worst]:.2e} ({worst}), "
          f"max {max(max_err.values()):.2e} ({max(max_err, key=max_err.get)}); grad norms {max(gnorms):.2f} max")
    if CASES[case]["clip_grad"] > 0:
        assert max(gnorms) > CASES[case]["clip_grad"]  # clipping is exercised
    assert loss_err <= 1e-5
    assert weight_err[worst] <= 1e-3, {n: f"{e:.1e}" for n, e in weight_err.items() if e > 1e-3}
