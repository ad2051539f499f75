"""Per-op times of one ViT block: ours (JAX, each op jitted on its own) next to timm's (PyTorch).

A whole-step ratio says how far apart two implementations are, not where. This splits one
pre-norm block into the ops both run (LayerNorm, the qkv / proj / fc1 / fc2 matmuls, the head
split and merge, the attention's two batched dots and softmax, GELU, the residual add) and times
each alone, forward and forward + backward (the vjp: input and parameter gradients), on the same
shapes, interleaved round by round (medians). The attention core is also timed as a whole:
ours (dots + softmax) against timm's `F.scaled_dot_product_attention`, the kernel timm calls.
The whole block closes the table; alone-op times do not sum to it (XLA fuses across ops).
`gemms`: the four weight matmuls again as bare dots, GFLOP/s of the two GEMM libraries.
"""

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from deit import hardware
from deit.config import ModelConfig
from deit.layers import Block, gelu

# Each timed call repeats its op until at least this long, so that millisecond ops are not
# dominated by the timer and dispatch; the figure is seconds per op call.
MIN_CALL_S = 0.05
PAUSE_S = 0.1  # idle before each timed call: spinning worker threads of the other framework


def _ours_ops(cfg: ModelConfig, batch: int, dtype: Any) -> dict[str, tuple[Callable, tuple, tuple]]:
    """name -> (f(params, *inputs), params, inputs) for our layers; params may be an empty tuple."""
    d, h, t = cfg.dim, cfg.heads, cfg.grid ** 2 + cfg.num_prefix_tokens
    hd = d // h
    blk = Block(d, h, key=jax.random.key(0))
    k = iter(jax.random.split(jax.random.key(1), 8))
    rnd = lambda *s: jax.random.normal(next(k), s, jnp.float32).astype(dtype)
    x, x3, x4 = rnd(batch, t, d), rnd(batch, t, 3 * d), rnd(batch, t, 4 * d)
    q, kk, v, logits = rnd(batch, h, t, hd), rnd(batch, h, t, hd), rnd(batch, h, t, hd), rnd(batch, h, t, t)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(dtype)
    scale = 1.0 / math.sqrt(hd)

    def split(_, a):
        return tuple(a.reshape(batch, t, 3, h, hd).transpose(2, 0, 3, 1, 4))

    return {
        "norm1": (lambda p, a: p(a), blk.norm1, (x,)),
        "qkv": (lambda p, a: p(a), blk.attn.qkv, (x,)),
        "split_heads": (split, (), (x3,)),
        "q@k": (lambda _, a, b: jnp.einsum("bhqd,bhkd->bhqk", a * jnp.asarray(scale, a.dtype), b), (), (q, kk)),
        "softmax": (lambda _, a: jax.nn.softmax(a.astype(jnp.float32), -1).astype(a.dtype), (), (logits,)),
        "attn@v": (lambda _, a, b: jnp.einsum("bhqk,bhkd->bhqd", a, b), (), (probs, v)),
        "merge_heads": (lambda _, a: a.transpose(0, 2, 1, 3).reshape(batch, t, d), (), (q,)),
        "proj": (lambda p, a: p(a), blk.attn.proj, (x,)),
        "residual": (lambda _, a, b: a + b, (), (x, x)),
        "norm2": (lambda p, a: p(a), blk.norm2, (x,)),
        "fc1": (lambda p, a: p(a), blk.mlp.fc1, (x,)),
        "gelu": (lambda _, a: gelu(a, False), (), (x4,)),
        "fc2": (lambda p, a: p(a), blk.mlp.fc2, (x4,)),
        "attention_core": (lambda _, a, b, c: jnp.einsum(
            "bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", a * jnp.asarray(scale, a.dtype), b)
                                              .astype(jnp.float32), -1).astype(a.dtype), c), (), (q, kk, v)),
        "block": (lambda p, a: p(a), blk, (x,)),
    }


def _timed_loop(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> Callable[[], float]:
    """A call that runs fn n times (n fixed at the first call: >= MIN_CALL_S) -> seconds per fn."""
    n = 0

    def call() -> float:
        nonlocal n
        if n == 0:
            t0 = time.perf_counter()
            sync(fn())
            n = max(1, math.ceil(MIN_CALL_S / max(time.perf_counter() - t0, 1e-6)))
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        sync(out)
        return (time.perf_counter() - t0) / n

    return call


def ours(cfg: ModelConfig, batch: int, dtype: str) -> dict[str, dict[str, Callable[[], float]]]:
    jd = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    out = {}
    for name, (f, params, inputs) in _ours_ops(cfg, batch, jd).items():
        fwd = eqx.filter_jit(f)
        cot = jax.tree.map(jnp.ones_like, fwd(params, *inputs))
        bwd = eqx.filter_jit(lambda p, xs, g, f=f: eqx.filter_vjp(f, p, *xs)[1](g))
        out[name] = {"fwd": _timed_loop(lambda f=fwd, p=params, xs=inputs: f(p, *xs), jax.block_until_ready),
                     "fwdbwd": _timed_loop(lambda b=bwd, p=params, xs=inputs, g=cot: b(p, xs, g),
                                           jax.block_until_ready)}
    return out


def timm(cfg: ModelConfig, batch: int, dtype: str, threads: int) -> dict[str, dict[str, Callable[[], float]]]:
    """The same ops as timm's `Block` runs them (its own submodules; torch for the glue)."""
    import torch
    import torch.nn.functional as F
    from timm.models.vision_transformer import Block as TimmBlock

    torch.set_num_threads(threads)
    d, h, t = cfg.dim, cfg.heads, cfg.grid ** 2 + cfg.num_prefix_tokens
    hd = d // h
    blk = TimmBlock(d, h, mlp_ratio=4, qkv_bias=True)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    x, x3, x4 = rnd(batch, t, d), rnd(batch, t, 3 * d), rnd(batch, t, 4 * d)
    q, k, v, logits = rnd(batch, h, t, hd), rnd(batch, h, t, hd), rnd(batch, h, t, hd), rnd(batch, h, t, t)
    probs = logits.softmax(-1)
    scale = hd ** -0.5

    def split(a):  # timm's Attention.forward
        return a.reshape(batch, t, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)

    ops = {
        "norm1": (blk.norm1, (x,)), "qkv": (blk.attn.qkv, (x,)), "split_heads": (split, (x3,)),
        "q@k": (lambda a, b: (a * scale) @ b.transpose(-2, -1), (q, k)),
        "softmax": (lambda a: a.softmax(-1), (logits,)),
        "attn@v": (lambda a, b: a @ b, (probs, v)),
        "merge_heads": (lambda a: a.transpose(1, 2).reshape(batch, t, d), (q,)),
        "proj": (blk.attn.proj, (x,)), "residual": (lambda a, b: a + b, (x, x)),
        "norm2": (blk.norm2, (x,)), "fc1": (blk.mlp.fc1, (x,)), "gelu": (blk.mlp.act, (x4,)),
        "fc2": (blk.mlp.fc2, (x4,)),
        "attention_core": (F.scaled_dot_product_attention, (q, k, v)),
        "block": (blk, (x,)),
    }
    autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
    params = list(blk.parameters())

    def fwd(f, xs):
        def run():
            with torch.no_grad(), autocast():
                return f(*xs)
        return run

    def fwdbwd(f, xs):
        leaves = [a.detach().clone().requires_grad_(True) for a in xs]

        def run():
            for p in params + leaves:
                p.grad = None
            with autocast():
                ys = f(*leaves)
            ys = ys if isinstance(ys, tuple) else (ys,)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
            return None
        return run

    return {name: {"fwd": _timed_loop(fwd(f, xs), lambda _: None),
                   "fwdbwd": _timed_loop(fwdbwd(f, xs), lambda _: None)} for name, (f, xs) in ops.items()}


def gemms(cfg: ModelConfig, batch: int, dtype: str, threads: int, rounds: int) -> list[dict[str, Any]]:
    """The block's four weight matmuls as bare dots (no bias, no autocast: both sides get inputs
    in the compute dtype), GFLOP/s of XLA's and of PyTorch's, interleaved rounds (medians): the
    GEMM library's share of a gap, apart from everything around the dots."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    d, t = cfg.dim, cfg.grid ** 2 + cfg.num_prefix_tokens
    jd, td = (jnp.bfloat16, torch.bfloat16) if dtype == "bfloat16" else (jnp.float32, torch.float32)
    rng = np.random.default_rng(0)
    dot = jax.jit(lambda a, b: a @ b)
    rows, fns = [], {}
    for op, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
        a, b = rng.standard_normal((batch * t, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a, jd), jnp.asarray(b, jd)
        ta, tb = torch.from_numpy(a).to(td), torch.from_numpy(b).to(td)
        fns[op] = (_timed_loop(lambda ja=ja, jb=jb: dot(ja, jb), jax.block_until_ready),
                   _timed_loop(lambda ta=ta, tb=tb: ta @ tb, lambda _: None))
        rows.append({"op": op, "m": batch * t, "k": k, "n": n})
    for ours_fn, timm_fn in fns.values():
        ours_fn(), timm_fn()
    times: dict[str, tuple[list[float], list[float]]] = {op: ([], []) for op in fns}
    for _ in range(rounds):
        for op, fn_pair in fns.items():
            for fn, acc in zip(fn_pair, times[op]):
                time.sleep(PAUSE_S)
                acc.append(fn())
    for row in rows:
        flops = 2 * row["m"] * row["k"] * row["n"]
        ours_s, timm_s = (statistics.median(v) for v in times[row["op"]])
        row |= {"ours_gflops": _sig(flops / ours_s / 1e9), "timm_gflops": _sig(flops / timm_s / 1e9),
                "ratio": _sig(timm_s / ours_s, 3)}
    return rows


def _sig(x: float, digits: int = 4) -> float:
    """Significant digits, not decimals: a 1 us op rounded to 4 decimals of a ms loses its ratio."""
    return float(f"{x:.{digits}g}")


def benchmark_ops(cfg: ModelConfig, *, batch: int = 32, dtype: str = "float32", rounds: int = 5,
                  threads: int | None = None) -> dict[str, Any]:
    """Rows of ms per op (ours / timm, fwd / fwd+bwd) and timm's time over ours (> 1: ours faster)."""
    threads = threads or len(os.sched_getaffinity(0))
    load_start = os.getloadavg()
    fns = {("ours", op, kind): fn for op, kinds in ours(cfg, batch, dtype).items() for kind, fn in kinds.items()}
    fns |= {("timm", op, kind): fn for op, kinds in timm(cfg, batch, dtype, threads).items()
            for kind, fn in kinds.items()}
    for fn in fns.values():  # compile, size the loops, warm up
        fn()
    times: dict[tuple[str, str, str], list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            time.sleep(PAUSE_S)
            times[key].append(fn())
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = []
    for op in dict.fromkeys(op for _, op, _ in fns):
        row: dict[str, Any] = {"op": op}
        for kind in ("fwd", "fwdbwd"):
            o, t = ms[("ours", op, kind)], ms[("timm", op, kind)]
            row |= {f"ours_{kind}_ms": _sig(o), f"timm_{kind}_ms": _sig(t), f"{kind}_ratio": _sig(t / o, 3)}
        rows.append(row)
    parts = [r for r in rows if r["op"] not in ("attention_core", "block")]
    sums = {k: round(sum(r[k] for r in parts), 3)
            for k in ("ours_fwd_ms", "timm_fwd_ms", "ours_fwdbwd_ms", "timm_fwdbwd_ms")}
    gemm_rows = gemms(cfg, batch, dtype, threads, rounds)
    import timm as timm_pkg
    import torch

    return dict(benchmark="ops", model=dict(dim=cfg.dim, heads=cfg.heads, image_size=cfg.image_size,
                                            patch_size=cfg.patch_size, pooling=cfg.pooling),
                tokens=cfg.grid ** 2 + cfg.num_prefix_tokens, batch=batch, dtype=dtype,
                backend=jax.default_backend(), cpu=hardware.cpu_model(), cpu_features=hardware.cpu_features(),
                threads=threads, torch_threads=torch.get_num_threads(), jax_version=jax.__version__,
                torch_version=torch.__version__, timm_version=timm_pkg.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), rounds=rounds,
                load_average_start=[round(v, 2) for v in load_start],
                bf16_dots_upcast=hardware.bf16_dots_upcast() if dtype == "bfloat16" else None,
                load_average=[round(v, 2) for v in os.getloadavg()], rows=rows, sum_of_parts=sums,
                gemms=gemm_rows)
