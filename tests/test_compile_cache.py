"""The runner's persistent compilation cache: where it goes, how to turn it off, that a recompile hits it."""

import os

import jax
import jax.numpy as jnp
import pytest

from nfnets_jax.runtime import compile_cache


@pytest.fixture
def restore_jax_cache():
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_cache_dir_defaults_to_the_workdir_and_the_environment_overrides_it(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.cache_dir_for(str(tmp_path)) == os.path.join(str(tmp_path), "compile_cache")
    monkeypatch.setenv(compile_cache.ENV_VAR, "/shared/xla_cache")
    assert compile_cache.cache_dir_for(str(tmp_path)) == "/shared/xla_cache"
    for off in ("off", "OFF", "0", "none", ""):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.cache_dir_for(str(tmp_path)) is None
        assert compile_cache.enable_for_workdir(str(tmp_path)) is None


def test_a_recompile_after_a_restart_reads_the_cache(monkeypatch, tmp_path, restore_jax_cache):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setattr(compile_cache, "MIN_COMPILE_SECONDS", 0.0)  # cache even this tiny program
    cache_dir = compile_cache.enable_for_workdir(str(tmp_path))
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)

    def program(x):
        return jnp.sin(x) @ x.T + 41.0

    x = jnp.ones((8, 8))
    expected = jax.jit(program)(x)
    assert os.listdir(cache_dir), "the first compile wrote nothing to the cache"
    assert not hits
    jax.clear_caches()  # what a new process starts with: nothing compiled in memory
    try:
        assert jnp.array_equal(jax.jit(program)(x), expected)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert hits, "the recompile did not read the persistent cache"
