"""The model and optimizer code runs on a box that has only JAX: it must never import TensorFlow.

TensorFlow feeds the input pipeline only (nfnets_jax/data); a GPU inference box or a notebook that
builds models, loads DeepMind's weights and swaps optimizers should not pay for (or need) it.
Checked in a fresh interpreter, since this test process may already have imported TensorFlow.
"""

import pathlib
import subprocess
import sys

_PROBE = """
import sys
import haiku as hk, jax, jax.numpy as jnp
import nfnets_jax.models, nfnets_jax.optim, nfnets_jax.weights, nfnets_jax.losses
import nfnets_jax.analysis.signal_propagation
# What a GPU/TPU benchmark or the memory plan needs: the runner's step, config schema and checkpoints.
import nfnets_jax.train.one_device_step, nfnets_jax.train.config_schema, nfnets_jax.train.checkpointing
import nfnets_jax.data.config, nfnets_jax.data.feeding
import benchmarks.train_step_throughput
net = hk.transform_with_state(lambda x: nfnets_jax.models.create(
    "nfnet_f0", 10, depths=(1, 1, 1, 1), widths=(16, 32, 64, 64), group_size=8,
    stem_channels=(8, 8, 8, 8))(x, False))
jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")))
"""


def test_models_optim_checkpoints_and_the_train_step_do_not_import_tensorflow():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
