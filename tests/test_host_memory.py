"""`nfnets_jax.runtime.host_memory`: with the settings on, XLA:CPU's per-execution scratch stops costing
fresh pages every call (counted as minor page faults, not timed), and every way to ask wrongly
for them is one clear error."""

import os
import subprocess
import sys

import pytest

from nfnets_jax.runtime import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program with a 64 MB temporary (the barrier keeps XLA from fusing it away): above any
# glibc mmap threshold, so by default each call maps and zero-fills 16,384 fresh 4 KiB pages.
# With the memory kept, the heap still grows now and then by one more copy of the temporary: small
# allocations made between two calls split the freed block, and the next call no longer fits in it
# (6 such growths in 120 calls here, then none). So the calls are counted once the process's peak
# memory has stopped growing (`_STEADY` calls in a row), which takes a variable number of calls
# under load, and must arrive within `_MAX_CALLS`.
_STEADY, _MAX_CALLS, _MEASURED = 10, 150, 15
_FAULTS_PER_CALL = f"""
import resource
from nfnets_jax.runtime import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x)) * 2.0))
x = jnp.ones((4096, 4096), jnp.float32)
calls, unchanged, peak = 0, 0, -1
while unchanged < {_STEADY} and calls < {_MAX_CALLS}:
    f(x).block_until_ready()
    calls += 1
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unchanged, peak = (unchanged + 1, peak) if now == peak else (0, now)
faults = []
for _ in range({_MEASURED}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, calls, sorted(faults)[len(faults) // 2])
"""


def _faults_per_call(choice):
    """Whether the settings were applied, the calls it took for the peak memory to settle, and the
    median call's minor page faults after that."""
    env = {**os.environ, host_memory.ENV_VAR: choice, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], capture_output=True, text=True, env=env,
                         check=True, timeout=300).stdout.split()
    return out[0] == "True", int(out[1]), float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_memory_removes_the_page_faults_of_a_large_temporary():
    applied_default, _, default_faults = _faults_per_call("default")
    applied_keep, settled_after, keep_faults = _faults_per_call("keep")
    assert not applied_default and applied_keep
    # The kept heap stops growing: a few more copies of the temporary, not one per call.
    assert settled_after < _MAX_CALLS, f"the peak memory still grew after {settled_after} calls"
    # Median call: the whole temporary faulted in again by default, next to nothing when kept.
    assert default_faults > 0.9 * (64 << 20) / 4096
    assert keep_faults < default_faults / 20, (keep_faults, default_faults)


def test_auto_follows_the_backend_jax_will_use(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_will_use_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.jax_will_use_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not host_memory.keep_freed_memory("auto")  # an accelerator host keeps glibc's defaults


def test_an_unknown_choice_names_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="auto, keep, default"):
        host_memory.keep_freed_memory("always")
    monkeypatch.setenv(host_memory.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=host_memory.ENV_VAR):
        host_memory.keep_freed_memory()


def test_libtpu_alone_is_not_a_tpu_host(monkeypatch, tmp_path):
    # libtpu is installed wherever the memory plan compiles for a TPU; JAX still runs on the CPU
    # there unless a TPU chip (Google's PCI vendor id) is attached, and so does `auto`.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    installed = {"libtpu"}
    monkeypatch.setattr(host_memory, "_installed", lambda name: name in installed)
    for index, vendor in enumerate(["0x8086", "0x10de"]):
        (tmp_path / f"dev{index}").mkdir()
        (tmp_path / f"dev{index}" / "vendor").write_text(vendor + "\n")
    monkeypatch.setattr(host_memory, "_PCI_VENDOR_FILES", str(tmp_path / "*" / "vendor"))
    assert not host_memory.tpu_chip_present()
    assert host_memory.jax_will_use_cpu()
    (tmp_path / "dev2").mkdir()
    (tmp_path / "dev2" / "vendor").write_text("0x1ae0\n")
    assert host_memory.tpu_chip_present()
    assert not host_memory.jax_will_use_cpu()
    installed.add("jax_cuda12_plugin")  # a GPU plugin decides on its own, chip or not
    (tmp_path / "dev2" / "vendor").write_text("0x10de\n")
    assert not host_memory.jax_will_use_cpu()
