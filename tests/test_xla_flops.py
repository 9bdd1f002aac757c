"""`models.flops.xla_flops`: XLA's own FLOP count of a compiled program, as the benchmarks report it."""

import jax
import jax.numpy as jnp

from nfnets_jax.models import flops


def test_a_matmul_costs_two_flops_per_multiply_add():
    m, k, n = 8, 16, 4
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert flops.xla_flops(compiled) == 2 * m * k * n


def test_a_program_without_arithmetic_has_no_count():
    compiled = jax.jit(lambda a: a).lower(jnp.ones((8, 16))).compile()
    assert flops.xla_flops(compiled) is None


def test_the_cost_analysis_has_flops_and_bytes_and_a_run_time_estimate_only_where_given():
    m, k, n = 8, 16, 4
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    cost = flops.xla_cost(compiled)
    assert cost["flops"] == 2 * m * k * n
    # At least the two f32 operands read and the product written, once each.
    assert cost["bytes_accessed"] >= 4 * (m * k + k * n + m * n)
    assert cost["optimal_seconds"] is None  # XLA:CPU has no performance model estimate.
