"""The Vision Transformer (ViT / DeiT / DeiT-III) as one Equinox pytree.

Blocks are stored stacked (every array leaf of `blocks` has a leading `layers` axis) and
run under `lax.scan`, so trace and compile time stay flat from Ti/16 (12 blocks) to H/14
(32 blocks); `scan_unroll` trades that for speed (see ModelConfig). Train/eval is toggled
with `eqx.nn.inference_mode`.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from deit.config import ModelConfig
from deit.sharding import constrain_batch
from deit.layers import SAVED_RESIDUALS, Block, Dropout, LayerNorm, Linear, PatchEmbed, trunc_normal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Size presets: with 1000 labels, layerscale and a learnable posemb these match timm's deit3_*.
PRESETS: dict[str, dict[str, int]] = {
    "ti16": dict(layers=12, dim=192, heads=3, patch_size=16),
    "s16": dict(layers=12, dim=384, heads=6, patch_size=16),
    "b16": dict(layers=12, dim=768, heads=12, patch_size=16),
    "l16": dict(layers=24, dim=1024, heads=16, patch_size=16),
    "h14": dict(layers=32, dim=1280, heads=16, patch_size=14),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def sincos2d(grid: int | tuple[int, int], dim: int, temperature: float = 10000.0) -> Float[Array, "n d"]:
    """Fixed 2-D sin-cos position table in deit3-jax's order, [sin(x), cos(x), sin(y), cos(y)].

    x is the patch's column (position along the width), y its row; frequencies
    1/T^linspace(0,1,dim/4). Laid out [rows, cols, dim] and flattened row-major, as the patch
    tokens. `grid` is the (rows, cols) patch grid, or one int for a square grid.
    """
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    freq = 1.0 / temperature ** jnp.linspace(0.0, 1.0, dim // 4)
    y, x = jnp.meshgrid(jnp.arange(rows), jnp.arange(cols), indexing="ij")
    x = x.reshape(-1, 1).astype(jnp.float32) * freq
    y = y.reshape(-1, 1).astype(jnp.float32) * freq
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


class ViT(eqx.Module):
    patch_embed: PatchEmbed
    cls_token: Float[Array, "1 1 d"] | None
    dist_token: Float[Array, "1 1 d"] | None
    pos_embed: Float[Array, "n d"] | None  # on patch tokens only; None for sincos2d
    pos_drop: Dropout
    blocks: Block  # stacked over `layers`
    norm: LayerNorm
    head: Linear | None
    head_dist: Linear | None
    cfg: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k_patch, k_cls, k_dist, k_pos, k_blocks, k_head, k_hdist = jax.random.split(key, 7)
        d = cfg.dim
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, d, key=k_patch)
        self.cls_token = trunc_normal(k_cls, (1, 1, d)) if cfg.pooling == "cls" else None
        self.dist_token = trunc_normal(k_dist, (1, 1, d)) if cfg.distilled else None
        self.pos_embed = trunc_normal(k_pos, (cfg.grid**2, d)) if cfg.posemb == "learnable" else None
        self.pos_drop = Dropout(cfg.dropout)

        # One key per block: a shared key would make every block identical.
        def make_block(k: PRNGKeyArray) -> Block:
            return Block(d, cfg.heads, dropout=cfg.dropout, droppath=cfg.droppath,
                         layerscale=cfg.layerscale_init if cfg.layerscale else None,
                         gelu_kind=cfg.gelu, key=k)

        self.blocks = eqx.filter_vmap(make_block)(jax.random.split(k_blocks, cfg.layers))
        self.norm = LayerNorm(d)
        self.head = Linear(d, cfg.labels, key=k_head) if cfg.labels > 0 else None
        self.head_dist = Linear(d, cfg.labels, key=k_hdist) if cfg.labels > 0 and cfg.distilled else None

    def with_options(self, **changes: Any) -> "ViT":
        """The same weights under changed non-structural options (grad_ckpt, scan_unroll, dropout,
        droppath, gelu)."""
        allowed = {"grad_ckpt", "scan_unroll", "dropout", "droppath", "gelu"}
        if set(changes) - allowed:
            raise ValueError(f"cannot change {sorted(set(changes) - allowed)} of a built model; allowed: {sorted(allowed)}")
        cfg = dataclasses.replace(self.cfg, **changes)
        arrays = iter(x for x in jax.tree.leaves(self) if eqx.is_array(x))
        leaves, treedef = jax.tree.flatten(skeleton(cfg))
        leaves = [next(arrays) if isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves]
        return jax.tree.unflatten(treedef, leaves)

    def position_embedding(self, grid: tuple[int, int] | None = None) -> Float[Array, "n d"]:
        """The position table for a (rows, cols) patch grid (default: the config's).

        sincos2d is computed for any grid, so such a model predicts at any size divisible by
        the patch size; a learnable table exists for its own grid only.
        """
        grid = (self.cfg.grid, self.cfg.grid) if grid is None else tuple(grid)
        if self.pos_embed is None:
            return sincos2d(grid, self.cfg.dim)
        if grid != (self.cfg.grid, self.cfg.grid):
            p = self.cfg.patch_size
            raise ValueError(f"image size {grid[0] * p}x{grid[1] * p} does not match this model's image_size="
                             f"{self.cfg.image_size} (learnable position embedding for a {self.cfg.grid}x"
                             f"{self.cfg.grid} grid); resize the images or fine-tune at the new size")
        return self.pos_embed

    def embed(self, x: Float[Array, "b h w 3"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        """Patch tokens plus position embedding, with the cls (and dist) token prepended."""
        p = self.cfg.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by patch_size={p}")
        pos = self.position_embedding((x.shape[1] // p, x.shape[2] // p))
        x = self.patch_embed(x)
        x = x + pos.astype(x.dtype)
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            b = x.shape[0]
            x = jnp.concatenate([jnp.broadcast_to(t.astype(x.dtype), (b, 1, x.shape[-1])) for t in prefix] + [x], 1)
        return self.pos_drop(x, key=key)

    def run_blocks(self, x: Float[Array, "b t d"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h, xs):
            p, k = xs
            return constrain_batch(eqx.combine(p, static)(constrain_batch(h), key=k)), None

        if self.cfg.grad_ckpt:
            body = jax.checkpoint(body)  # rematerialise each block in the backward pass
        else:  # keep only the matmul outputs and the residual stream (see SAVED_RESIDUALS)
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(*SAVED_RESIDUALS))
        keys = jax.random.split(key, self.cfg.layers) if key is not None else None
        unroll = self.cfg.layers if self.cfg.scan_unroll == -1 else self.cfg.scan_unroll
        x, _ = jax.lax.scan(body, x, (params, keys), unroll=unroll)
        return x

    def features(self, x: Float[Array, "b h w 3"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b t d"]:
        """All tokens after the final norm."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        return self.norm(self.run_blocks(self.embed(x, key=k1), key=k2))

    def pool(self, tokens: Float[Array, "b t d"]) -> Float[Array, "b d"]:
        if self.cfg.pooling == "cls":
            return tokens[:, 0]
        return tokens.mean(1)

    def forward_heads(self, x: Float[Array, "b h w 3"], *, key: PRNGKeyArray | None = None
                      ) -> tuple[Float[Array, "b c"], Float[Array, "b c"] | None]:
        """(class logits, distillation logits or None): what distillation training needs."""
        if self.head is None:
            raise ValueError("model has labels=0: no head; use `features`")
        tokens = self.features(x, key=key)
        logits = self.head(self.pool(tokens))
        dist = self.head_dist(tokens[:, 1]) if self.head_dist is not None else None
        return logits, dist

    def __call__(self, x: Float[Array, "b h w 3"], *, key: PRNGKeyArray | None = None) -> Float[Array, "b ..."]:
        """Logits [B, labels]; for a distilled model the mean of both heads (DeiT's inference rule).

        With labels=0, the normalised tokens [B, T, D].
        """
        if self.head is None:
            return self.features(x, key=key)
        logits, dist = self.forward_heads(x, key=key)
        return logits if dist is None else (logits + dist) / 2


def skeleton(cfg: ModelConfig) -> ViT:
    """The model's structure with ShapeDtypeStructs for arrays: shapes without allocating."""
    return eqx.filter_eval_shape(ViT, cfg, key=jax.random.key(0))


def init_model(cfg: ModelConfig, seed: int = 0) -> ViT:
    # Jitted: one compiled init instead of hundreds of dispatched random ops.
    return eqx.filter_jit(ViT)(cfg, key=jax.random.key(seed))


def count_params(cfg_or_model: "ModelConfig | ViT") -> int:
    """Number of trainable scalars (computed from shapes only: no memory is allocated)."""
    model = cfg_or_model
    if isinstance(model, ModelConfig):
        model = skeleton(model)
    leaves = jax.tree.leaves(model)
    return int(sum(math.prod(x.shape) for x in leaves if isinstance(x, (jax.Array, jax.ShapeDtypeStruct))))


def forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per image (2 per multiply-add) of the matmuls, which dominate a ViT."""
    d, n = cfg.dim, cfg.grid**2
    t = n + cfg.num_prefix_tokens
    patch = 2 * n * (3 * cfg.patch_size**2) * d
    per_block = 2 * t * d * (3 * d) + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * (4 * d)
    heads = 2 * d * cfg.labels * (1 + cfg.distilled)
    return int(patch + cfg.layers * per_block + heads)


def normalize(images: UInt8[Array, "*b h w 3"] | Float[Array, "*b h w 3"]) -> Float[Array, "*b h w 3"]:
    """uint8 [0, 255] -> ImageNet-normalised float32."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@eqx.filter_jit
def _predict(model: ViT, images: Array) -> Array:
    return model(normalize(images))


def _check_images(cfg: ModelConfig, images: Any) -> None:
    """One ValueError naming what is wrong with `images` for a model of `cfg`, before tracing."""
    shape, dtype = tuple(np.shape(images)), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (one image: add a batch axis, images[None])" if len(shape) == 3 and shape[-1] == 3 else ""
        raise ValueError(f"images of shape {shape}: expected [B, H, W, 3], a batch of RGB images{hint}")
    if dtype != np.uint8:
        raise ValueError(f"images of dtype {dtype}: only uint8 is allowed (values 0..255; predict normalises "
                         f"them itself)")
    if 0 in shape:
        raise ValueError(f"images of shape {shape}: empty")
    _, h, w, _ = shape
    p = cfg.patch_size
    if cfg.posemb == "learnable" and (h, w) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"image size {h}x{w} does not match this model's image_size={cfg.image_size} (learnable "
                         f"position embedding for a {cfg.grid}x{cfg.grid} grid); resize the images to "
                         f"{cfg.image_size}x{cfg.image_size} or fine-tune at the new size")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p} (this sincos2d model predicts at "
                         f"any size that is)")


def predict(model: ViT, images: Array | np.ndarray) -> Float[Array, "b c"]:
    """Logits for uint8 images [B, H, W, 3] (jax or numpy): normalisation and eval mode inside.

    A learnable-position model takes its own image_size; a sincos2d one any size divisible by
    the patch size. Anything else is one ValueError naming it.
    """
    _check_images(model.cfg, images)
    return _predict(eqx.nn.inference_mode(model), jnp.asarray(images))
