"""deit.hostmem: with glibc kept from unmapping freed blocks, a repeated XLA:CPU call stops
page-faulting its temporaries (each is measured in a fresh process: the setting must come before
JAX's backend starts)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys
sys.path.insert(0, "src")
from deit import hostmem
print(hostmem.retain_freed_memory() if sys.argv[1] == "on" else False)
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (4096, 256))
f = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum(0))  # a 64 MiB intermediate (4096 x 4096 f32)
for _ in range(3):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    applied, with_it = faults("on")
    _, without = faults("off")
    assert applied == "True"
    # 3 calls x 64 MiB in 4 KiB pages = 49,152 faults when each call maps its temporary afresh.
    assert without > 30_000, without
    assert with_it < 3_000, with_it


def test_the_entry_scripts_apply_it_first():
    for script in ("src/train.py", "src/evaluate.py", "src/benchmark.py"):
        tail = open(script).read().rstrip().splitlines()[-2:]
        assert tail == ['    hostmem.retain_freed_memory()  # before JAX starts its backend: deit/hostmem.py says why',
                        "    main()"], script
