"""Running per-image and per-slice functions where the batch already is.

Under a data-sharded mesh each device works on its own slice of the batch (`per_device`: a
`jax.shard_map` over the batch axes), so augmentation and mixing never move an image between
devices. Within a device `map_images` runs a per-image function over the slice: on CPU one image
at a time through `lax.map` ('map'), so a `lax.switch` / `lax.cond` runs only the chosen branch
(vmap would turn them into selects that run every op on every image, 4x slower there); on
GPU/TPU chunks of `ACCELERATOR_CHUNK` images vmapped ('vmap'), where running every branch is
cheap and parallel.
"""

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

PerImage = Literal["auto", "map", "vmap"]

# Mesh axes that shard the batch when the input's sharding does not say (Auto axes).
DATA_AXES = ("data", "fsdp")
# Images vmapped together on the 'vmap' path (a constant, read when the function is traced).
ACCELERATOR_CHUNK = 64


def _batch_axes(x: jax.Array) -> tuple[object, tuple[str, ...]]:
    """(mesh, axes) when x's batch dim is sharded over mesh axes (explicit spec, else DATA_AXES)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None, ()
    spec = tuple(sharding.spec) if sharding.spec is not None else ()
    if spec and spec[0] is not None:
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    else:
        axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = tuple(a for a in axes if types[a] != AxisType.Manual)
    n = math.prod(mesh.shape[a] for a in axes)
    if n <= 1 or x.shape[0] % n:
        return None, ()
    return mesh, axes


def per_device(fn: Callable, replicated: tuple, sharded: tuple):
    """fn(device_index, *replicated, *sharded) on each device's slice (dim 0) of `sharded`.

    Under a mesh that shards the batch (see `_batch_axes`) this is a `jax.shard_map`: each
    device works on its own slice and nothing crosses devices; otherwise fn sees the whole
    batch with device_index 0. `replicated` arguments (keys) are passed whole. Arguments may be
    numpy arrays or numbers: fn gets jax arrays.
    """
    replicated, sharded = (tuple(jnp.asarray(a) for a in args) for args in (replicated, sharded))
    mesh, axes = _batch_axes(sharded[0])
    if not axes:
        return fn(jnp.int32(0), *replicated, *sharded)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == AxisType.Explicit for a in axes):  # explicit axes: say it (a local slice, no traffic)
        sharded = tuple(jax.sharding.reshard(s, jax.NamedSharding(mesh, P(axes))) for s in sharded)
    return jax.shard_map(lambda *a: fn(jax.lax.axis_index(axes), *a), mesh=mesh,
                         in_specs=(P(),) * len(replicated) + (P(axes),) * len(sharded), out_specs=P(axes))(
        *replicated, *sharded)


def map_images(fn: Callable, keys: jax.Array, images: jax.Array | np.ndarray, per_image: PerImage = "auto"):
    """fn(key, image) for each image: 'map' one at a time (real branches), 'vmap' chunks of
    ACCELERATOR_CHUNK (every branch, in parallel), 'auto' 'map' on CPU and 'vmap' elsewhere."""
    if per_image not in ("auto", "map", "vmap"):
        raise ValueError(f"per_image={per_image!r}: allowed 'auto', 'map', 'vmap'")
    mode = per_image if per_image != "auto" else ("map" if jax.default_backend() == "cpu" else "vmap")
    images = jnp.asarray(images)
    chunk = None if mode == "map" else min(ACCELERATOR_CHUNK, images.shape[0])
    return jax.lax.map(lambda a: fn(*a), (keys, images), batch_size=chunk)


__all__ = ["ACCELERATOR_CHUNK", "DATA_AXES", "PerImage", "map_images", "per_device"]
