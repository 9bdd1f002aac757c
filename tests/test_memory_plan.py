"""The memory plan reads XLA's memory analysis of the real train step; remat lowers its temporaries."""

import pytest

from experiments import memory_plan


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "measured, not yet understood: per-block hk.remat does not lower XLA:CPU's temporary "
    "allocation for the one-block-per-stage digits NFNet (0.0868 vs 0.0865 GiB at per-device "
    "batch 256, 0.0080 vs 0.0077 at 16); the remat memory claim is open (issue 11)"))
def test_remat_lowers_temporaries_and_the_row_adds_up():
    # A batch at which the stored activations outweigh the tiny model's parameter-sized temporaries.
    plain = memory_plan.measure("digits.py", per_device_batch=256, remat=False, time_steps=0)
    remat = memory_plan.measure("digits.py", per_device_batch=256, remat=True, time_steps=0)
    assert plain.per_device_batch == remat.per_device_batch == 256
    # The state (params, momentum, EMA) is the same either way; only the stored activations change.
    assert remat.argument_gib == pytest.approx(plain.argument_gib)
    assert remat.temp_gib < plain.temp_gib
    assert plain.peak_gib <= plain.argument_gib + plain.output_gib + plain.temp_gib
    # Recomputing the blocks' forward shows up in XLA's FLOP count.
    assert remat.gflops > plain.gflops


def test_fits_uses_the_headroom():
    row = memory_plan.Row(config="x", model="m", image_size=1, per_device_batch=1, compute_dtype="float32",
                          remat=False, argument_gib=1.0, output_gib=1.0, temp_gib=13.0, peak_gib=14.5,
                          gflops=None, compile_s=0.0)
    fits = row.fits()
    assert not fits["TPUv3 16G"]  # 14.5 > 0.9 * 16
    assert fits["TPUv4 32G"] and fits["H200 141G"]
