"""Train-step throughput: our jitted step next to timm/PyTorch's on the same architecture.

`benchmark_train` builds the real train step (`steps.make_train_step`: forward, backward,
AdamW update, metrics, non-finite guard, donated state) and eval step (`steps.eval_step`) on
one device, the same ViT in timm (`VisionTransformer` built from our `ModelConfig`, so any
size compares like for like) with timm's AdamW, and a large square matmul as the device's
measured peak. Everything timed is timed in interleaved rounds (ours, theirs, matmul, ...),
so load from other processes hits all alike; figures are medians over rounds.
"""

import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from deit import hardware, hostmem, optim, recipes, sharding
from deit.config import AugmentConfig, Config, ModelConfig, from_flat
from deit.model import ViT, count_params, forward_flops, preset, skeleton
from deit.steps import eval_step, init_state, make_train_step

# Augmentation "on": the DeiT recipe's on-device policy (RandAugment m9, erasing 0.25, hflip,
# Mixup 0.8 / CutMix 1.0, smoothing 0.1); the same for the t/s/b recipes.
AUGMENT_RECIPE = "deit-s16-224-in1k-300ep"
# Augmentation "off": normalisation only, the step timm's model sees (its augmentation runs on the host).
NO_AUGMENT = AugmentConfig(random_crop="none", hflip=0.0)


def bench_config(model: ModelConfig, batch: int, dtype: str, augment: str | None) -> Config:
    """AdamW at deit's defaults (lr 1e-3, wd 0.05), no warmup; `augment` names the recipe whose
    on-device augmentation the step runs (None: normalisation only)."""
    if augment is not None:
        flags = recipes.flags(augment)
        aug = AugmentConfig(**{f.name: flags[f.name] for f in dataclasses.fields(AugmentConfig) if f.name in flags})
    else:
        aug = NO_AUGMENT
    cfg = from_flat(dict(train_batch_size=batch, valid_batch_size=batch, compute_dtype=dtype, optimizer="adamw"))
    return dataclasses.replace(cfg, model=model, augment=aug)


def model_config(name: str, image_size: int = 224, labels: int = 1000, layers: int | None = None,
                 scan_unroll: int = 1) -> ModelConfig:
    """A preset at a given resolution / label count (`layers` shrinks it for quick checks);
    `scan_unroll` 0 unrolls the layer scan fully."""
    cfg = preset(name, image_size=image_size, labels=labels, **({"layers": layers} if layers else {}))
    return dataclasses.replace(cfg, scan_unroll=scan_unroll or cfg.layers)


def images_and_labels(batch: int, size: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), rng.integers(0, labels, batch, dtype=np.int32)


def timed_first_call(fn: Callable[[], Any]) -> float:
    """Seconds of the first call: trace + compile + one run."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class OursTrain:
    """Our train step with its state held here; each call is one step on a freshly placed batch
    (the step donates the batch, as in the trainer's loop)."""

    def __init__(self, cfg: Config, images: np.ndarray, labels: np.ndarray):
        self.mesh = sharding.make_mesh(1, jax.devices()[:1])
        opt = optim.build(cfg, skeleton(cfg.model))
        # Built by one jitted call, as the trainer does: every leaf its own buffer (donatable).
        make = lambda: init_state(ViT(cfg.model, key=jax.random.key(cfg.init_seed)), opt.tx)
        self.state = eqx.filter_jit(make)()
        self.step_fn = make_train_step(cfg, opt.tx, opt.schedule)
        self.images, self.labels = images, labels

    def __call__(self) -> None:
        self.state, metrics = self.step_fn(self.state, *sharding.shard_batch(self.mesh, self.images, self.labels))
        jax.block_until_ready(metrics["loss"])


class OursEval:
    def __init__(self, train: OursTrain):
        self.train = train
        self.batch = sharding.shard_batch(train.mesh, train.images, train.labels,
                                          np.ones(len(train.labels), bool))

    def __call__(self) -> None:
        jax.block_until_ready(eval_step(self.train.state.model, *self.batch))


def timm_vit(cfg: ModelConfig):
    """timm's VisionTransformer with our architecture: position embedding on patch tokens only
    (`no_embed_class`, as ours), LayerScale / distillation token / pooling as configured."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    if cfg.posemb != "learnable":
        raise ValueError("timm comparison needs posemb='learnable'")
    kw = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.dim, depth=cfg.layers,
              num_heads=cfg.heads, mlp_ratio=4, num_classes=cfg.labels, no_embed_class=True,
              init_values=cfg.layerscale_init if cfg.layerscale else None,
              global_pool="token" if cfg.pooling == "cls" else "avg", class_token=cfg.pooling == "cls",
              drop_rate=cfg.dropout, drop_path_rate=cfg.droppath)
    return (VisionTransformerDistilled if cfg.distilled else VisionTransformer)(**kw)


class Timm:
    """timm's model, AdamW (timm's create_optimizer_v2: no decay on biases/norms) and CE; a train
    call is zero_grad + forward + backward + step; bf16 runs under torch.autocast."""

    def __init__(self, cfg: Config, images: np.ndarray, labels: np.ndarray, threads: int, compile: bool = False):
        import torch
        from timm.optim import create_optimizer_v2

        self.torch = torch
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = timm_vit(cfg.model).to(self.device)
        if compile:  # torch.compile (inductor) of the module: forward and, via AOTAutograd, backward
            self.model = torch.compile(self.model)
        self.opt = create_optimizer_v2(self.model, "adamw", lr=cfg.optim.learning_rate,
                                       weight_decay=cfg.optim.weight_decay)
        mean, std = np.asarray((0.485, 0.456, 0.406)), np.asarray((0.229, 0.224, 0.225))
        x = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)  # NCHW, normalised
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        self.y = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.loss = torch.nn.CrossEntropyLoss()
        self.autocast = cfg.optim.compute_dtype == "bfloat16"

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def train(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.torch.autocast(self.device, self.torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self._sync()

    def eval(self) -> None:
        self.model.eval()
        with self.torch.inference_mode(), self.torch.autocast(self.device, self.torch.bfloat16,
                                                              enabled=self.autocast):
            self.model(self.x)
        self._sync()


def matmul(n: int, dtype: Any) -> Callable[[], None]:
    """An n x n x n matmul on the default device; 2 n^3 FLOPs per call."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    return lambda: jax.block_until_ready(f(a, b))


# Untimed pause before each timed call: torch's OpenMP and XLA's Eigen worker threads spin for
# a while after their work, which would otherwise steal the cores from whichever runs next.
PAUSE_S = 0.2


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, repeats: dict[str, int] | None = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each fn, round by round; fns with `repeats` k keep the best of k per round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            best = float("inf")
            for _ in range((repeats or {}).get(k, 1)):
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[k].append(best)
    return times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def device_peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


def benchmark_train(model: ModelConfig, *, batch: int = 32, dtype: str = "float32", rounds: int = 5,
                    warmup: int = 1, matmul_size: int | None = None, timm: bool = True, augment: bool = True,
                    threads: int | None = None, augment_recipes: tuple[str, ...] = (AUGMENT_RECIPE,),
                    timm_compile: bool = False) -> dict[str, Any]:
    """Images/s of our train step (augmentation off and on), eval forward, timm's, MFU; see
    src/benchmark.py's docstring for the fields. With `augment`, the step is also timed with
    each of `augment_recipes`' on-device augmentation (the first is `train_aug`); timm's model
    runs under torch.compile with `timm_compile`."""
    threads = threads or len(os.sched_getaffinity(0))
    matmul_size = matmul_size or (3072 if jax.default_backend() == "cpu" else 8192)
    load_start = os.getloadavg()
    images, labels = images_and_labels(batch, model.image_size, max(model.labels, 1))
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    fns: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}

    fns["train"] = OursTrain(bench_config(model, batch, dtype, None), images, labels)
    compile_s["train"] = timed_first_call(fns["train"])
    fns["eval"] = OursEval(fns["train"])
    compile_s["eval"] = timed_first_call(fns["eval"])
    aug_keys = {r: "train_aug" if i == 0 else f"train_aug:{r}" for i, r in enumerate(augment_recipes)} if augment else {}
    for r, k in aug_keys.items():
        fns[k] = OursTrain(bench_config(model, batch, dtype, r), images, labels)
        compile_s[k] = timed_first_call(fns[k])
    fns["matmul"] = matmul(matmul_size, jdtype)
    compile_s["matmul"] = timed_first_call(fns["matmul"])
    interleaved(fns, warmup)
    ours_rss = peak_rss_mib()  # before torch is imported: our process alone
    device_peak = device_peak_mib()
    if timm:
        t = Timm(bench_config(model, batch, dtype, None), images, labels, threads, compile=timm_compile)
        fns["timm_train"], fns["timm_eval"] = t.train, t.eval
        compile_s["timm_train"] = timed_first_call(t.train)  # torch.compile compiles on first call
        compile_s["timm_eval"] = timed_first_call(t.eval)
        # Warm up everything again, interleaved as timed: the heap then holds both steps' blocks.
        interleaved(fns, warmup)

    times = interleaved(fns, rounds, {"matmul": 3})
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = forward_flops(model)
    peak = 2 * matmul_size**3 / med["matmul"]
    ips = {k: batch / v for k, v in med.items() if k != "matmul"}
    out: dict[str, Any] = dict(
        benchmark="train", model=dataclasses.asdict(model), batch=batch, image_size=model.image_size, dtype=dtype,
        backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
        cpu=hardware.cpu_model(), cpu_features=hardware.cpu_features(), cpu_count=os.cpu_count(), threads=threads,
        jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
        host_memory_retained=hostmem.retained(),  # deit.hostmem: applies to timm's step too (one process)
        load_average_start=[round(v, 2) for v in load_start], load_average=[round(v, 2) for v in os.getloadavg()],
        params=count_params(model), forward_flops_per_image=flops, rounds=rounds,
        train_images_per_s=round(ips["train"], 2), eval_images_per_s=round(ips["eval"], 2),
        train_flops_per_s=round(3 * flops * ips["train"]), eval_flops_per_s=round(flops * ips["eval"]),
        matmul_size=matmul_size, matmul_peak_flops_per_s=round(peak),
        train_mfu=round(3 * flops * ips["train"] / peak, 4), eval_mfu=round(flops * ips["eval"] / peak, 4),
        compile_s={k: round(v, 2) for k, v in compile_s.items()},
        ours_peak_host_rss_mib=round(ours_rss, 1), peak_host_rss_mib=round(peak_rss_mib(), 1),
        device_peak_mib=device_peak,
        seconds={k: [round(s, 4) for s in v] for k, v in times.items()})
    if jax.default_backend() != "cpu":  # accelerators: also MFU against the vendor's dense peak
        from deit.hardware import peak_flops

        vendor, source = peak_flops(dtype)
        if source.startswith("spec:"):
            vendor /= jax.device_count()  # one device is used here
            out.update(vendor_peak_flops_per_s=vendor, vendor_peak_source=source,
                       train_mfu_vendor=round(3 * flops * ips["train"] / vendor, 4))
    if augment:
        out["train_aug_images_per_s"] = round(ips["train_aug"], 2)
        out["augment_recipe"] = augment_recipes[0]
        out["augment_images_per_s"] = {r: round(ips[k], 2) for r, k in aug_keys.items()}
    if timm:
        import timm as timm_pkg
        import torch

        from timm.layers import use_fused_attn

        out.update(timm_version=timm_pkg.__version__, torch_version=torch.__version__,
                   torch_threads=torch.get_num_threads(), timm_device=t.device, timm_compile=timm_compile,
                   timm_fused_attn=bool(use_fused_attn()),  # F.scaled_dot_product_attention (SDPA)
                   timm_train_images_per_s=round(ips["timm_train"], 2),
                   timm_eval_images_per_s=round(ips["timm_eval"], 2),
                   train_ratio=round(ips["train"] / ips["timm_train"], 3),
                   eval_ratio=round(ips["eval"] / ips["timm_eval"], 3),
                   # timm's model FLOP/s against the same peak: a ratio r over timm needs our MFU
                   # to reach r times this, so above 1 / timm_*_mfu no step of ours can get.
                   timm_train_mfu=round(3 * flops * ips["timm_train"] / peak, 4),
                   timm_eval_mfu=round(flops * ips["timm_eval"] / peak, 4))
    return out
