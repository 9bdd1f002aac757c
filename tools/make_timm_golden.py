"""Writes tests/data/timm_golden/: a tiny NFNet built by timm's own code, its weights and logits.

Developer tool, run once by hand in a separate venv that has a CPU torch and timm (never a
dependency of this package, never run in CI), and absl-py for its flags (they are read as every
program of this project reads them, `experiments/command_line.py`):

    $TIMM_VENV/bin/python tools/make_timm_golden.py                       # the committed golden
    $TIMM_VENV/bin/python tools/make_timm_golden.py --full --out=/tmp/f0  # full dm_nfnet_f0, not committed

The tiny model is timm's `NormFreeNet` with timm's `dm_nfnet_f0` config (deep-quad stem, SAME
padding, gamma in the activation, skipinit, SE after conv3, two grouped 3×3 convs, final conv
×2), shrunk only in widths: stages (32, 64, 128, 128), stem 16, group size 16; the depths
(1, 2, 6, 3) and group counts (1, 2, 4, 4) are F0's. Weights are random and made to matter:
timm initialises skip gains to 0 and gains to 1, so every gain, skip gain and bias is drawn at
random too. The input (2 images of 36×44 px) makes every stride-2 layer see odd or even sizes,
so asymmetric SAME padding and partial pooling windows are exercised.

Logits are recorded for the same weights under four numerics (`NUMERICS`):
- `logits_timm`: timm's dm_nfnet as shipped (exact-erf GELU; weight standardisation with
  `std_conv_eps` = 1e-5 added to the variance);
- `logits_deepmind_numerics`: the same timm network with DeepMind's two numeric choices
  (tanh-approximate GELU; eps 1e-12, as torch needs eps > 0: this equals DeepMind's 1e-4 floor
  on fan_in·var whenever fan_in·var > 1e-4, true for these weights). Our converted model must
  match these to 1e-4 relative;
- `logits_timm_gelu_only`, `logits_timm_eps_only`: one of timm's two choices at a time, to
  attribute the difference.

Files: `weights.safetensors` (written by the `safetensors` package, read in the tests by our
NumPy reader), `golden.npz` (input NHWC, the logits), `golden.json` (model settings,
versions) and `dm_nfnet_f0_state_shapes.json` (timm's key -> shape for the full dm_nfnet_f0).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import types

import numpy as np
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from the timm venv: experiments/ is not installed there
from experiments import command_line  # noqa: E402  pylint: disable=wrong-import-position
TINY = {"channels": (32, 64, 128, 128), "stem_chs": 16, "group_size": 16, "num_features": 256}
NUM_CLASSES = 10
INPUT_SHAPE = (2, 3, 36, 44)  # NCHW, as timm takes it.


class _StandInMeta(type):
    """A class whose attributes are further stand-ins and which refuses to be instantiated."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandInMeta(f"{cls.__name__}.{attr}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__name__} is a stand-in: torchvision is not installed")


def install_torchvision_stand_ins() -> None:
    """timm imports torchvision at import time (data transforms) but the NFNet forward never
    uses it, and torchvision does not install beside a CPU-only torch here: register inert
    modules so that `import timm` works."""
    try:
        import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        return
    except ImportError:
        pass
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
             "torchvision.utils", "torchvision.io")
    for name in names:
        module = types.ModuleType(name)

        def module_getattr(attr, _name=name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _StandInMeta(f"{_name}.{attr}", (), {})

        module.__getattr__ = module_getattr
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def randomize_(model, seed: int) -> None:
    """Random values for every tensor, so that none can be dropped or swapped unnoticed."""
    import torch  # pylint: disable=import-outside-toplevel

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            if name.endswith("skipinit_gain"):
                value = 0.5 + torch.rand(shape, generator=generator)
            elif name.endswith(".gain"):
                value = 0.5 + torch.rand(shape, generator=generator)
            elif name.endswith("bias"):
                value = 0.2 * torch.randn(shape, generator=generator)
            else:  # Weights: any scale works for standardised convs; linears get fan-in scaling.
                fan_in = int(np.prod(shape[1:]))
                scale = (0.5 + torch.rand((), generator=generator)) / fan_in**0.5
                value = scale * torch.randn(shape, generator=generator)
            param.copy_(value)


# Numerics to record: (timm activation name, std_conv_eps). One network, several forward passes.
NUMERICS = {
    "timm": ("gelu", 1e-5),  # timm's dm_nfnet_f* as shipped.
    "deepmind_numerics": ("gelu_tanh", 1e-12),  # DeepMind's choices (torch needs eps > 0).
    "timm_gelu_only": ("gelu", 1e-12),  # Only timm's exact-erf GELU.
    "timm_eps_only": ("gelu_tanh", 1e-5),  # Only timm's standardisation eps.
}


def build_models(full: bool):
    """(config, {numerics name: NormFreeNet}): networks that differ only in `NUMERICS`."""
    from timm.models import nfnet  # pylint: disable=import-outside-toplevel

    base = nfnet.model_cfgs["dm_nfnet_f0"]
    cfg = base if full else dataclasses.replace(base, **TINY)
    num_classes = 1000 if full else NUM_CLASSES
    # timm looks up each activation's gain by name; the tanh GELU has the same gain as DeepMind's.
    nfnet._nonlin_gamma.setdefault("gelu_tanh", nfnet._nonlin_gamma["gelu"])  # pylint: disable=protected-access
    models = {
        name: nfnet.NormFreeNet(dataclasses.replace(cfg, act_layer=act, std_conv_eps=eps), num_classes=num_classes)
        for name, (act, eps) in NUMERICS.items()
    }
    return cfg, {name: model.eval() for name, model in models.items()}


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_string("out", str(REPO_ROOT / "tests" / "data" / "timm_golden"), "Folder for the golden files (created).",
                    flag_values=FLAGS)
flags.DEFINE_bool("full", False, "Full-size dm_nfnet_f0 at 256 px (not for committing).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the random weights (the images use seed + 1).", lower_bound=0,
                     flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], flag_values=FLAGS,
                             multihost=False, positional=False)
    args = FLAGS

    install_torchvision_stand_ins()
    try:
        import safetensors.torch  # pylint: disable=import-outside-toplevel
        import timm  # pylint: disable=import-outside-toplevel
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        command_line.fail(f"{error}: run this with the Python of a venv that has torch, timm and safetensors "
                          "(docs/speed.md says how to make it), e.g. $TIMM_VENV/bin/python tools/make_timm_golden.py")

    torch.set_num_threads(2)
    cfg, models = build_models(args.full)
    randomize_(models["timm"], args.seed)
    state = {key: value.contiguous() for key, value in models["timm"].state_dict().items()}
    for model in models.values():
        model.load_state_dict(state, strict=True)

    num_classes = 1000 if args.full else NUM_CLASSES
    input_shape = (2, 3, 256, 256) if args.full else INPUT_SHAPE
    images = torch.randn(input_shape, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.inference_mode():
        logits = {f"logits_{name}": model(images).numpy() for name, model in models.items()}

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(out / "weights.safetensors"), metadata={"format": "pt"})
    np.savez(
        out / "golden.npz",
        allow_pickle=False,
        images_nhwc=images.numpy().transpose(0, 2, 3, 1),
        **logits,
    )
    our_kwargs = {} if args.full else {
        "depths": list(cfg.depths),
        "widths": list(cfg.channels),
        "group_size": cfg.group_size,
        "stem_channels": [cfg.stem_chs // 8, cfg.stem_chs // 4, cfg.stem_chs // 2, cfg.stem_chs],
    }
    facts = {
        "made_by": "tools/make_timm_golden.py" + (" --full" if args.full else ""),
        "timm_config": "timm.models.nfnet.model_cfgs['dm_nfnet_f0']" + ("" if args.full else f" with {TINY}"),
        "our_model": "nfnet_f0",
        "our_kwargs": our_kwargs,
        "num_classes": num_classes,
        "seed": args.seed,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__},
        "numerics": {name: {"act_layer": act, "std_conv_eps": eps} for name, (act, eps) in NUMERICS.items()},
        "max_abs_logit_difference_from_deepmind_numerics": {
            name: float(np.max(np.abs(value - logits["logits_deepmind_numerics"]))) for name, value in logits.items()
        },
    }
    (out / "golden.json").write_text(json.dumps(facts, indent=2) + "\n")
    if not args.full:  # timm's own names and shapes for the full F0, for the name-table test.
        full_f0 = timm.create_model("dm_nfnet_f0", pretrained=False, device="meta")
        shapes = {key: list(value.shape) for key, value in full_f0.state_dict().items()}
        lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(shape)}" for key, shape in shapes.items())
        (out / "dm_nfnet_f0_state_shapes.json").write_text("{\n" + lines + "\n}\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
