"""deit: DeiT and DeiT-III vision transformers in Equinox/JAX."""

from deit.interop import load_model, save_model
from deit.model import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, ViT, count_params, forward_flops, init_model, predict, preset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ModelConfig", "ViT", "count_params", "forward_flops",
    "init_model", "load_model", "predict", "preset", "save_model",
]
