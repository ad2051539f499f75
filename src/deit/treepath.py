"""Names of pytree leaves, one rule for every module that addresses weights by name.

A leaf's name is its key path joined with dots, `blocks.attn.qkv.weight`: timm's naming for
everything that is not stacked per block, so weights interop, fine-tuning and the optimiser's
masks all speak it. Checkpoints keep their own older on-disk key (`checkpoint_key`), which
must not change, or saved runs would no longer load.
"""

from typing import Any

import jax
import numpy as np


def leaf_name(path: tuple) -> str:
    """'blocks.attn.qkv.weight' for a key path (as `tree_flatten_with_path` yields it)."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def leaf_parts(path: tuple) -> list[str]:
    """The parts of `leaf_name`: ['blocks', 'attn', 'qkv', 'weight']."""
    return [jax.tree_util.keystr((k,), simple=True) for k in path]


def leaf_names(tree: Any) -> list[tuple[str, Any]]:
    """(name, leaf) for every array (or ShapeDtypeStruct) leaf of a model or its skeleton."""
    return [(leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))]


def checkpoint_key(path: tuple) -> str:
    """The key a leaf has in a checkpoint file, '.blocks.attn.qkv.weight' (jax's default keystr):
    the on-disk format of every checkpoint written so far."""
    return jax.tree_util.keystr(path)


__all__ = ["checkpoint_key", "leaf_name", "leaf_names", "leaf_parts"]
