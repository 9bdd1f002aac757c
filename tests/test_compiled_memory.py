"""`analysis.compiled_memory` against programs whose buffers can be counted by hand: elementwise
programs that XLA fuses into one loop (no temporaries), so arguments and outputs are their arrays'
element counts times their dtypes' sizes, and a donated argument reused by the output is aliased."""

import jax
import jax.numpy as jnp
import pytest

from nfnets_jax.analysis import compiled_memory


def _memory(fn, *shapes, donate=()):
    return compiled_memory.compiled_memory(jax.jit(fn, donate_argnums=donate).lower(*shapes).compile())


def test_arguments_and_outputs_are_their_arrays_bytes():
    x = jax.ShapeDtypeStruct((1000,), jnp.float32)  # 4000 bytes
    y = jax.ShapeDtypeStruct((1000,), jnp.int8)  # 1000 bytes
    memory = _memory(lambda x, y: x * 2 + y.astype(jnp.float32), x, y)
    assert (memory.argument_bytes, memory.output_bytes, memory.temp_bytes, memory.alias_bytes) == (5000, 4000, 0, 0)
    assert memory.peak_bytes == 5000 + 4000
    assert memory.peak_gib == pytest.approx(9000 / 2**30)


def test_a_donated_argument_reused_by_the_output_is_counted_once():
    x = jax.ShapeDtypeStruct((512, 4), jnp.bfloat16)  # 4096 bytes
    memory = _memory(lambda x: x * 2, x, donate=(0,))
    assert (memory.argument_bytes, memory.output_bytes, memory.alias_bytes) == (4096, 4096, 4096)
    assert memory.peak_bytes == 4096 + memory.temp_bytes


def test_the_record_keeps_xla_field_names_and_the_peak():
    memory = compiled_memory.CompiledMemory(argument_bytes=10, output_bytes=20, temp_bytes=30, alias_bytes=5,
                                            generated_code_bytes=7)
    assert memory.as_record() == {"argument_size_in_bytes": 10, "output_size_in_bytes": 20,
                                  "temp_size_in_bytes": 30, "alias_size_in_bytes": 5,
                                  "generated_code_size_in_bytes": 7, "peak_estimate": 55}


def test_a_backend_without_the_analysis_is_an_error():
    class NoAnalysis:
        def memory_analysis(self):
            return None

    with pytest.raises(ValueError, match="no memory analysis"):
        compiled_memory.compiled_memory(NoAnalysis())
