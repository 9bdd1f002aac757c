"""Installs nfnets-jax: `pip install -e ".[test]"` for development."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.8",
    "dm-haiku>=0.0.13",
    "optax>=0.2.4",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "absl-py>=2.0",
    "orbax-checkpoint>=0.11",
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.6",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "chex>=0.1.87",
    "dill>=0.3.6",  # only to write 2021-style weight files in tests; the loader never imports it
    "nbclient>=0.10",  # the notebook tests execute notebooks/ end to end
    "nbformat>=5.10",
    "ipykernel>=6.29",
]

# `experiments.memory_plan --target tpu-*`: libtpu's compiler, which compiles for a TPU with none
# attached (JAX keeps running on the CPU of a host without a TPU chip, but every JAX process then
# logs libtpu's failed probe for one, so it is an extra, not part of the test environment).
TPU_PLAN_REQUIRES = ['libtpu>=0.0.42; sys_platform == "linux" and platform_machine == "x86_64"']

setuptools.setup(
    name="nfnets-jax",
    version="0.1.0",
    description=(
        "Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) in JAX/Haiku, "
        "exact to DeepMind's released weights."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # DeepMind's NFNet code's licence; NOTICE says what comes from it
    python_requires=">=3.11",  # jax >= 0.8 needs 3.11,
    # `experiments/` and `configs/` install under the package (nfnets_jax.experiments, .configs),
    # not as stray top-level `experiments`/`configs` in site-packages; in a checkout they stay
    # top-level (`python3 -m experiments.train`). nfnets_jax/cli.py explains the console scripts.
    packages=setuptools.find_packages(include=["nfnets_jax", "nfnets_jax.*"])
    + ["nfnets_jax.experiments", "nfnets_jax.configs"],
    package_dir={"nfnets_jax.experiments": "experiments", "nfnets_jax.configs": "configs"},
    # The pretrained models this project trained (nfnets_jax/weights/pretrained.py): a few MB.
    package_data={"nfnets_jax.weights": ["files/*.npz", "files/*.json"]},
    entry_points={"console_scripts": ["nfnets-train = nfnets_jax.cli:train",
                                      "nfnets-eval = nfnets_jax.cli:evaluate"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "tpu-plan": TPU_PLAN_REQUIRES},
)
