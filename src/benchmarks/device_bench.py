"""One command for an accelerator: `python src/benchmark.py device`.

For ViT-S/16 and ViT-B/16 (bf16 by default), on the first device: our train step's images/s
without augmentation and with each on-device policy (DeiT's RandAugment + erasing + Mixup/CutMix,
DeiT-III's 3-Augment + jitter + Mixup/CutMix), the augmentation's share of the step, MFU against
the vendor's dense peak (deit.hardware; on CPU a matmul measured in the same run), timm's train
step on the same device (torch.compile where the device is a GPU, bf16 autocast, SDPA), eval,
compile times and peak device memory; then the host loader's images/s with all cores. All of it
comes from `train_bench.benchmark_train` and `loader_bench.benchmark_loader`, so each figure means
what it means in `benchmark.py train` / `loader`.

A time budget (default 8 minutes) is checked between parts: a part that would start after it
is skipped and named in `skipped`, never cut short. On CPU the default is a tiny version of the
same run (2 blocks, 32 px, batch 4, few images) that checks the command end to end in seconds.
"""

import os
import tempfile
import time
from typing import Any

import jax

from benchmarks import loader_bench, train_bench

DEIT_POLICY = "deit-s16-224-in1k-300ep"  # RandAugment m9 + erasing 0.25 + Mixup/CutMix
DEIT3_POLICY = "deit3-s16-224-in1k-400ep"  # 3-Augment + colour jitter 0.3 + Mixup/CutMix
# Issue 16's goals for ViT-B/16 bf16 with augmentation on an H100/H200.
GOALS = {"b16_train_aug_mfu": 0.45, "b16_train_vs_timm": 1.3}


def benchmark_device(models: tuple[str, ...] = ("s16", "b16"), *, batch: int | None = None,
                     image_size: int | None = None, layers: int | None = None, dtype: str = "bfloat16",
                     rounds: int | None = None, timm: bool = True, timm_compile: bool | None = None,
                     loader: bool = True, loader_images: int | None = None, budget_s: float = 480.0) -> dict[str, Any]:
    start = time.perf_counter()
    small = jax.default_backend() == "cpu"  # a tiny version that checks the command end to end
    batch = batch or (4 if small else 256)
    image_size = image_size or (32 if small else 224)
    layers = layers or (2 if small else None)
    rounds = rounds or (2 if small else 5)
    timm_compile = (jax.default_backend() == "gpu") if timm_compile is None else timm_compile
    out: dict[str, Any] = dict(benchmark="device", backend=jax.default_backend(),
                               device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
                               tiny=small, dtype=dtype, batch=batch, image_size=image_size, layers=layers,
                               rounds=rounds, budget_s=budget_s, models={}, skipped=[])

    def time_left() -> bool:
        return time.perf_counter() - start < budget_s

    for name in models:
        if not time_left():
            out["skipped"].append(name)
            continue
        cfg = train_bench.model_config(name, image_size, 1000, layers)
        r = train_bench.benchmark_train(cfg, batch=batch, dtype=dtype, rounds=rounds, warmup=1,
                                        matmul_size=128 if small else None, timm=timm,
                                        augment_recipes=(DEIT_POLICY, DEIT3_POLICY), timm_compile=timm_compile)
        peak = r.get("vendor_peak_flops_per_s", r["matmul_peak_flops_per_s"])

        def mfu(images_per_s: float) -> float:  # model FLOPs (3x forward) only, as timm counts
            return round(3 * r["forward_flops_per_image"] * images_per_s / peak, 4)

        plain = r["train_images_per_s"]
        m: dict[str, Any] = dict(
            params=r["params"], forward_flops_per_image=r["forward_flops_per_image"],
            train_images_per_s=plain, train_mfu=mfu(plain),
            mfu_peak_flops_per_s=peak, mfu_peak_source=r.get("vendor_peak_source", "measured matmul (this run)"),
            eval_images_per_s=r["eval_images_per_s"],
            device_peak_mib=r["device_peak_mib"],  # the process's peak so far (models run in order)
            compile_s=r["compile_s"])
        for policy, recipe in (("deit", DEIT_POLICY), ("deit3", DEIT3_POLICY)):
            ips = r["augment_images_per_s"][recipe]
            m[f"train_aug_{policy}_images_per_s"] = ips
            m[f"train_aug_{policy}_mfu"] = mfu(ips)
            m[f"augment_{policy}_fraction_of_step"] = round(max(0.0, 1 - ips / plain), 4)
        if timm:
            m.update(timm_train_images_per_s=r["timm_train_images_per_s"],
                     timm_eval_images_per_s=r["timm_eval_images_per_s"],
                     train_vs_timm=r["train_ratio"], eval_vs_timm=r["eval_ratio"],
                     timm_train_mfu=mfu(r["timm_train_images_per_s"]))
            out.update(timm_version=r["timm_version"], torch_version=r["torch_version"],
                       timm_compile=r["timm_compile"], timm_fused_attn=r["timm_fused_attn"],
                       timm_device=r["timm_device"])
        out["models"][name] = m
        out.update(cpu=r["cpu"], jax_version=r["jax_version"])

    if loader and time_left():
        workers = os.cpu_count() or 1
        n = loader_images or (48 if small else 2000)
        with tempfile.TemporaryDirectory(prefix="deit-device-bench-") as tmp:
            spec = loader_bench.photo_shards(tmp, n, size=(500, 375), quality=90)
            bs = 8 if small else 128
            lr = loader_bench.benchmark_loader(spec, image_size=224, batch_size=bs, workers=workers,
                                               batches=max(1, n // bs - 2), warmup=1, shuffle_buffer=min(n, 1000))
        out["loader"] = dict(workers=workers, images_per_s=round(lr["images_per_s"], 1),
                             images_per_s_per_core=round(lr["images_per_s_per_core"], 1), batches=lr["batches"],
                             pipeline="tar + JPEG decode + RandomResizedCrop 224 (skimage JPEGs, 500x375, q90)")
    elif loader:
        out["skipped"].append("loader")

    b16 = out["models"].get("b16")
    if b16 and not small:
        out["goals"] = {
            "b16_train_aug_mfu": dict(target=GOALS["b16_train_aug_mfu"], measured=b16["train_aug_deit3_mfu"]),
            **({"b16_train_vs_timm": dict(target=GOALS["b16_train_vs_timm"], measured=b16["train_vs_timm"])}
               if timm else {})}
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out
