"""Benchmarks: `python src/benchmark.py SUBCOMMAND [options]`, each printing ONE JSON object.

Subcommands:
  augment   images/s of the DeiT (RandAugment + erasing + Mixup/CutMix) and DeiT-III (3-Augment
            + color jitter + Mixup/CutMix) on-device train transforms, of timm's PIL transforms
            for the same policies (one core), and the device transform's cost as a fraction of a
            ViT-Ti/16 train step (AdamW, softmax CE) on the same device.
  loader    host images/s (total and per core) of our train loader (tar read, shuffle, JPEG
            decode, RandomResizedCrop, batching) next to timm's PIL train pipeline (decode,
            RandomResizedCrop, flip, RandAugment, ToTensor, Normalize) over the same JPEG bytes,
            one process, and their ratio per core. Without --shards: skimage photos as shards.
  train     images/s of our full jitted train step (forward, backward, AdamW update, metrics) on
            one device, with on-device augmentation off and on, and of the same step in
            timm/PyTorch (same architecture built from our config, timm's AdamW, CE, torch threads
            = usable cores, bf16 via autocast with --dtype bfloat16), eval forward of both, achieved
            model FLOP/s and MFU against a large square matmul timed in the same run. All timed
            calls interleave round by round; figures are medians (see benchmarks.train_bench).
            Fields: benchmark, model (ModelConfig), batch, image_size, dtype, backend, device, cpu,
            cpu_count, threads, jax_version, xla_flags, host_memory_retained (deit.hostmem's malloc
            setting, on unless DEIT_HOST_MALLOC=default; timm's step shares it), load_average_start,
            load_average (at the end), params, forward_flops_per_image (matmuls, deit.model.forward_flops), rounds,
            train_images_per_s (augmentation off: normalise only), train_aug_images_per_s (the
            DeiT recipe's RandAugment + erasing + Mixup/CutMix; field augment_recipe),
            eval_images_per_s (steps.eval_step), train_flops_per_s (3 x forward FLOPs x images/s),
            eval_flops_per_s, matmul_size, matmul_peak_flops_per_s (n x n f32/bf16 matmul in JAX,
            best of 3 per round, median), train_mfu, eval_mfu (FLOP/s over that peak), compile_s
            {train, eval, train_aug, matmul} (first call: trace + compile + one run),
            ours_peak_host_rss_mib (process peak before torch is imported), peak_host_rss_mib
            (whole run), device_peak_mib (accelerators only, else null), seconds {name: per round};
            with timm: timm_version, torch_version, torch_threads, timm_device,
            timm_train_images_per_s, timm_eval_images_per_s, train_ratio, eval_ratio (ours / timm),
            timm_train_mfu, timm_eval_mfu (timm's model FLOP/s over the same peak);
            on accelerators with a known spec (deit.hardware): vendor_peak_flops_per_s,
            vendor_peak_source, train_mfu_vendor. XLA flags come from $XLA_FLAGS (recorded).
  device    the accelerator check, in at most --budget-s (8 min): for ViT-S/16 and ViT-B/16 in
            bf16 (batch 256), our train step's images/s with augmentation off and with the DeiT
            and DeiT-III on-device policies (`augment_*_fraction_of_step`: the policy's share of
            the step), MFU against the vendor's dense peak (deit.hardware; CPU: measured matmul),
            timm's step on the same device (torch.compile on GPUs, bf16 autocast, SDPA) and the
            ratio, eval images/s, compile seconds, peak device memory; the host loader's images/s
            with all cores; `goals`: issue 16's targets next to the measured B/16 figures. Parts
            past the budget are listed in `skipped`. On CPU: a tiny version (2 blocks, 32 px).
  ops       one ViT block of the model split into the ops both implementations run (LayerNorm,
            qkv / proj / fc1 / fc2 matmuls, head split / merge, the attention's batched dots and
            softmax, GELU, residual; the attention core and the whole block too), each jitted
            alone: ms per op, forward and forward + backward, ours and timm's, interleaved rounds
            (medians); rows [{op, ours_fwd_ms, timm_fwd_ms, fwd_ratio, ours_fwdbwd_ms,
            timm_fwdbwd_ms, fwdbwd_ratio}] with ratio = timm's time / ours (> 1: ours faster),
            sum_of_parts; gemms [{op, m, k, n, ours_gflops, timm_gflops, ratio}]: the block's
            four weight matmuls as bare dots in the compute dtype (XLA's GEMM vs PyTorch's);
            bf16_dots_upcast (bf16 only: XLA compiles a bf16 dot as an f32 one). Shows where a
            whole-step gap between the two comes from.

Add a subcommand: write `cmd_NAME(args) -> dict` and register its options in `SUBCOMMANDS`.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from deit import hostmem


def _photos(n: int, size: int) -> np.ndarray:
    """n real photographs (skimage), random crops resized to size x size: content matters for
    histogram ops (equalize, autocontrast)."""
    import skimage.data
    from PIL import Image

    srcs = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        src = srcs[i % len(srcs)]
        h, w = src.shape[:2]
        s = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        out.append(np.asarray(Image.fromarray(src[y:y + s, x:x + s]).resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)


POLICIES = {
    # The augment sections of recipes/deit-*-300ep.json and recipes/deit3-*-in1k-*.json.
    "deit": dict(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0,
                 label_smoothing=0.1, criterion="ce"),
    "deit3": dict(auto_augment="3a", color_jitter=0.3, mixup=0.8, cutmix=1.0, criterion="bce"),
}


def _patch_timm_posterize() -> None:
    """Pillow >= 10 rejects posterize(bits=0), which timm's PosterizeIncreasing asks for at
    magnitude 10; keep the old behaviour (black) so the benchmark does not crash."""
    from PIL import Image
    from timm.data import auto_augment as taa

    def posterize(img, bits, **_):
        return Image.new(img.mode, img.size, 0) if bits <= 0 else taa.posterize(img, bits)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        taa.NAME_TO_OP[name] = posterize


def _timm_transform(policy: str, size: int):
    """timm / torchvision's PIL train transform after the crop (the host crops in both designs)."""
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from timm.data import auto_augment as taa
    from timm.data.random_erasing import RandomErasing

    _patch_timm_posterize()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=Image.Resampling.BICUBIC)
    if policy == "deit":
        ops = [T.RandomHorizontalFlip(), taa.rand_augment_transform(POLICIES[policy]["auto_augment"], hparams),
               T.ToTensor(), T.Normalize(mean, std), RandomErasing(0.25, mode="pixel", device="cpu")]
    else:
        ops = [T.RandomHorizontalFlip(), taa.auto_augment_transform("3a", hparams), T.ColorJitter(0.3, 0.3, 0.3),
               T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops), torch


def cmd_augment(args: argparse.Namespace) -> dict:
    import equinox as eqx
    import jax
    import optax
    from PIL import Image
    from timm.data import Mixup

    from deit import augment, hardware, mixing
    from deit.config import AugmentConfig, LossConfig
    from deit.model import init_model, preset

    b, size, n_timm = args.batch, args.size, args.timm_images - args.timm_images % 2
    images = jax.numpy.asarray(_photos(b, size))
    labels = jax.numpy.arange(b) % args.labels
    pil = [Image.fromarray(a) for a in np.asarray(images)]
    out: dict = dict(benchmark="augment", backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                     cpu=hardware.cpu_model(), cpu_features=hardware.cpu_features(), cpu_count=os.cpu_count(),
                     load_average=[round(v, 2) for v in os.getloadavg()], batch=b, image_size=size,
                     note="device = train_transform + one_hot_targets + mixup_cutmix, jitted, on uint8 batches "
                          "already at model size; timm = the same policies in PIL/torch after the crop on one "
                          "thread, Mixup on the batch; timings interleaved round by round (so load from other "
                          "processes hits all alike), medians")

    # Everything to time, as name -> (compile-and-run once, timed run(i)).
    timed: dict[str, Callable[[int], object]] = {}
    policies: dict[str, dict] = {}
    for name, fields in POLICIES.items():
        loss_keys = {f.name for f in dataclasses.fields(LossConfig)}
        cfg = AugmentConfig(**{k: v for k, v in fields.items() if k not in loss_keys})
        loss = LossConfig(**{k: v for k, v in fields.items() if k in loss_keys})

        @jax.jit
        def transform(key, x, y, cfg=cfg, loss=loss):
            k1, k2 = jax.random.split(key)
            t = mixing.one_hot_targets(loss, y, args.labels)
            return mixing.mixup_cutmix(cfg, k2, augment.train_transform(cfg, k1, x), t)

        t0 = time.perf_counter()
        jax.block_until_ready(transform(jax.random.key(0), images, labels))
        policies[name] = dict(config=fields, compile_s=round(time.perf_counter() - t0, 2))
        timed[f"{name}/device"] = (lambda f: lambda i: jax.block_until_ready(f(jax.random.key(i), images, labels)))(
            transform)

        tf, torch = _timm_transform(name, size)
        torch.set_num_threads(1)
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=fields.get("label_smoothing", 0.0),
                      num_classes=args.labels)
        target = torch.as_tensor(np.arange(n_timm) % args.labels)
        timed[f"{name}/timm"] = (lambda tf, mixup: lambda i: mixup(
            torch.stack([tf(pil[j % b]) for j in range(n_timm)]), target))(tf, mixup)

    if args.step:
        model = init_model(preset("ti16", labels=args.labels, image_size=size))
        tx = optax.adamw(1e-3, weight_decay=0.05)
        state = [model, tx.init(eqx.filter(model, eqx.is_array))]

        def loss_fn(m, x, t):
            return optax.softmax_cross_entropy(m(x), t).mean()

        @eqx.filter_jit(donate="all")
        def train_step(m, s, x, t):
            loss, grads = eqx.filter_value_and_grad(loss_fn)(m, x, t)
            updates, s = tx.update(grads, s, eqx.filter(m, eqx.is_array))
            return eqx.apply_updates(m, updates), s, loss

        x, t = augment.eval_transform(images), jax.nn.one_hot(labels, args.labels)

        def step(_):
            state[0], state[1], loss = train_step(state[0], state[1], x, t)
            jax.block_until_ready(loss)

        t0 = time.perf_counter()
        step(0)
        out["train_step"] = dict(model="ViT-Ti/16 (ti16)", optimizer="adamw", loss="softmax CE", batch=b,
                                 compile_s=round(time.perf_counter() - t0, 2))
        timed["train_step"] = step

    for fn in timed.values():  # warm-up round
        fn(-1)
    times: dict[str, list[float]] = {k: [] for k in timed}
    for i in range(args.repeats):
        for k, fn in timed.items():
            if k.endswith("/timm") and i >= args.timm_repeats:
                continue
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    for name, p in policies.items():
        dev = med[f"{name}/device"]
        p.update(device_ms_per_batch=round(dev * 1e3, 2), device_images_per_s=round(b / dev, 1),
                 timm_images_per_s_per_core=round(n_timm / med[f"{name}/timm"], 1))
        if args.step:
            p["fraction_of_train_step"] = round(dev / med["train_step"], 4)
    if args.step:
        out["train_step"].update(ms=round(med["train_step"] * 1e3, 1), images_per_s=round(b / med["train_step"], 2))
    out["policies"] = policies
    out["rounds"] = {k: len(v) for k, v in times.items()}
    return out


def _timm_train_pipeline(size: int):
    """timm's DeiT train transform on PIL images, as timm's create_transform(is_training=True,
    auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic') builds it, without erasing."""
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from timm.data import auto_augment as taa

    _patch_timm_posterize()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=Image.Resampling.BICUBIC)
    return T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), taa.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams),
                      T.ToTensor(), T.Normalize(mean, std)]), torch


def cmd_loader(args: argparse.Namespace) -> dict:
    import io
    import tempfile

    from PIL import Image

    from benchmarks import loader_bench
    from deit import hardware
    from deit.data.loader import resolve_shards
    from deit.data.shards import shard_records

    tmp = None
    spec = args.shards
    if spec is None:
        tmp = tempfile.TemporaryDirectory(prefix="deit-loader-bench-")
        t0 = time.perf_counter()
        spec = loader_bench.photo_shards(tmp.name, args.count, size=(500, 375), quality=90)
        build_s = time.perf_counter() - t0
    try:
        urls = resolve_shards(spec)
        files = [r.image for r in shard_records(urls, range(len(urls)), 0) if r.image is not None]
        if not files:
            raise ValueError(f"shard spec {spec!r} holds no images")
        sizes = []
        for b in files[:200]:
            with Image.open(io.BytesIO(b)) as im:
                sizes.append(im.size)
        tf, torch = _timm_train_pipeline(args.size)
        torch.set_num_threads(1)
        per_round = args.batches * args.batch

        def ours() -> tuple[float, float | None]:  # images/s, images per CPU second
            r = loader_bench.benchmark_loader(spec, image_size=args.size, batch_size=args.batch, workers=args.workers,
                                              batches=args.batches, warmup=args.warmup,
                                              shuffle_buffer=args.shuffle_buffer)
            return r["images_per_s"], r["images_per_cpu_s"]

        def timm(i: int) -> tuple[float, float]:  # images/s, images per CPU second
            # this thread's CPU time: the process's would also count our loader's threads still winding down
            t0, c0 = time.perf_counter(), time.thread_time()
            for j in range(per_round):
                # as timm's ImageFolder loader: PIL open + convert('RGB'), from the same tar bytes
                tf(Image.open(io.BytesIO(files[(i * per_round + j) % len(files)])).convert("RGB"))
            return per_round / (time.perf_counter() - t0), per_round / (time.thread_time() - c0)

        timm(-1) if args.rounds > 1 else None  # warm-up (imports, first-call costs)
        ours_r, timm_r, ours_cpu, timm_cpu = [], [], [], []
        for i in range(args.rounds):  # interleaved: load from other processes hits both alike
            ips, ipc = ours()
            ours_r.append(ips)
            ours_cpu.append(ipc)
            ips, ipc = timm(i)
            timm_r.append(ips)
            timm_cpu.append(ipc)
    finally:
        if tmp is not None:
            tmp.cleanup()
    ours_ips, timm_ips = statistics.median(ours_r), statistics.median(timm_r)
    cores = max(1, args.workers)
    out = dict(benchmark="loader", shards=args.shards or f"generated: {args.count} skimage JPEGs, q90",
               images=len(files), mean_jpeg_bytes=round(sum(map(len, files)) / len(files)),
               source_size=[round(statistics.mean(s[0] for s in sizes)), round(statistics.mean(s[1] for s in sizes))],
               image_size=args.size, batch_size=args.batch, batches_per_round=args.batches, rounds=args.rounds,
               workers=args.workers, cores_used=cores, cpu=hardware.cpu_model(), cpu_features=hardware.cpu_features(),
               cpu_count=os.cpu_count(), load_average=[round(v, 2) for v in os.getloadavg()],
               jpeg_decoder=loader_bench.jpeg_decoder(), timm_jpeg_decoder=loader_bench.pil_jpeg_decoder(),
               ours_pipeline="tar read + seeded shuffle + simplejpeg decode + RandomResizedCrop (Pillow's bicubic as "
                             "sparse float32 matmuls, deit.crop.resize) + uint8 batch "
                             "(flip/RandAugment/normalize run on the device)",
               timm_pipeline="PIL decode + RandomResizedCrop(224, bicubic) + RandomHorizontalFlip + "
                             "RandAugment rand-m9-mstd0.5-inc1 + ToTensor + Normalize, torch 1 thread",
               ours_images_per_s=round(ours_ips, 1), ours_images_per_s_per_core=round(ours_ips / cores, 1),
               timm_images_per_s_per_core=round(timm_ips, 1),
               ratio_per_core=round(ours_ips / cores / timm_ips, 2),
               ours_rounds=[round(v, 1) for v in ours_r], timm_rounds=[round(v, 1) for v in timm_r],
               round_ratios=[round(o / cores / t, 2) for o, t in zip(ours_r, timm_r)])
    if args.workers == 0:  # CPU-time rates: robust to other processes on the cores (one process)
        ours_c, timm_c = statistics.median(ours_cpu), statistics.median(timm_cpu)
        out.update(ours_images_per_cpu_s=round(ours_c, 1), timm_images_per_cpu_s=round(timm_c, 1),
                   ratio_per_cpu_s=round(ours_c / timm_c, 2))
    if tmp is not None:
        out["build_s"] = round(build_s, 1)
    return out


def cmd_ops(args: argparse.Namespace) -> dict:
    from benchmarks import ops_bench, train_bench

    cfg = train_bench.model_config(args.model, args.image_size)
    return ops_bench.benchmark_ops(cfg, batch=args.batch, dtype=args.dtype, rounds=args.rounds)


def cmd_device(args: argparse.Namespace) -> dict:
    from benchmarks import device_bench

    return device_bench.benchmark_device(tuple(args.models.split(",")), batch=args.batch, image_size=args.image_size,
                                         layers=args.layers, dtype=args.dtype, rounds=args.rounds, timm=args.timm,
                                         timm_compile=args.timm_compile, loader=args.loader, budget_s=args.budget_s)


def cmd_train(args: argparse.Namespace) -> dict:
    from benchmarks import train_bench

    cfg = train_bench.model_config(args.model, args.image_size, args.labels, args.layers, args.scan_unroll)
    return train_bench.benchmark_train(cfg, batch=args.batch, dtype=args.dtype, rounds=args.rounds,
                                       warmup=args.warmup, matmul_size=args.matmul_size, timm=args.timm,
                                       augment=args.augment)


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[argparse.ArgumentParser], None], str]] = {
    "augment": (cmd_augment, lambda p: (
        p.add_argument("--batch", type=int, default=32),
        p.add_argument("--size", type=int, default=224),
        p.add_argument("--labels", type=int, default=1000),
        p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)"),
        p.add_argument("--timm-repeats", type=int, default=3, help="rounds that also time timm"),
        p.add_argument("--timm-images", type=int, default=64, help="images per timed timm run"),
        p.add_argument("--step", action=argparse.BooleanOptionalAction, default=True,
                       help="also time a ViT-Ti/16 train step"),
    ), "on-device augmentation vs timm's PIL transforms and a ViT-Ti/16 train step"),
    "loader": (cmd_loader, lambda p: (
        p.add_argument("--shards", default=None, help="webdataset shard spec; default: generate skimage JPEGs"),
        p.add_argument("--count", type=int, default=2000, help="JPEGs to generate without --shards"),
        p.add_argument("--size", type=int, default=224),
        p.add_argument("--batch", type=int, default=64),
        p.add_argument("--batches", type=int, default=16, help="timed batches per round (timm: as many images)"),
        p.add_argument("--warmup", type=int, default=2, help="untimed batches per round"),
        p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)"),
        p.add_argument("--workers", type=int, default=0, help="loader worker processes (0: one core)"),
        p.add_argument("--shuffle-buffer", type=int, default=1000),
    ), "host train loader vs timm's PIL train pipeline, images/s per core on JPEGs"),
    "train": (cmd_train, lambda p: (
        p.add_argument("--model", default="s16", help="model preset (ti16, s16, b16, l16, h14)"),
        p.add_argument("--batch", type=int, default=32),
        p.add_argument("--image-size", type=int, default=224),
        p.add_argument("--labels", type=int, default=1000),
        p.add_argument("--layers", type=int, default=None, help="override the preset's depth (quick checks)"),
        p.add_argument("--scan-unroll", type=int, default=1,
                       help="blocks per layer-scan iteration (model.scan_unroll; 0: all, fully unrolled)"),
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype (parameters and optimiser state stay f32)"),
        p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (medians)"),
        p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation"),
        p.add_argument("--matmul-size", type=int, default=None,
                       help="n of the n x n x n peak matmul (default 3072 on CPU, 8192 on accelerators)"),
        p.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True,
                       help="also time timm/PyTorch's step"),
        p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="also time the step with the DeiT recipe's on-device augmentation"),
    ), "train step / eval forward images/s and MFU vs timm/PyTorch on the same architecture"),
    "device": (cmd_device, lambda p: (
        p.add_argument("--models", default="s16,b16", help="comma-separated presets"),
        p.add_argument("--batch", type=int, default=None, help="default 256 (CPU: 4)"),
        p.add_argument("--image-size", type=int, default=None, help="default 224 (CPU: 32)"),
        p.add_argument("--layers", type=int, default=None, help="override the depth (default: the preset's; CPU: 2)"),
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16"),
        p.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 5; CPU: 2)"),
        p.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True),
        p.add_argument("--timm-compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile timm's model (default: on GPUs)"),
        p.add_argument("--loader", action=argparse.BooleanOptionalAction, default=True,
                       help="also time the host loader with all cores"),
        p.add_argument("--budget-s", type=float, default=480.0,
                       help="parts that would start after this many seconds are skipped (and listed)"),
    ), "accelerator check: ViT-S/B bf16 train img/s, MFU vs vendor peak, timm, augmentation cost, loader"),
    "ops": (cmd_ops, lambda p: (
        p.add_argument("--model", default="s16", help="model preset (ti16, s16, b16, l16, h14)"),
        p.add_argument("--batch", type=int, default=32),
        p.add_argument("--image-size", type=int, default=224),
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32"),
        p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (medians)"),
    ), "one ViT block op by op (forward, forward + backward), ours vs timm's, ms per op"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    result = SUBCOMMANDS[args.command][0](args)
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    hostmem.retain_freed_memory()  # before JAX starts its backend: deit/hostmem.py says why
    main()
