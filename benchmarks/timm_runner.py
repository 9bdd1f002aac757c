"""The PyTorch side of `benchmarks.compare_timm`: timm's `dm_nfnet_f0` timed on command.

Runs under the interpreter of a separate venv that has torch and timm (never a dependency of this
package; see README, Speed). It imports nothing from `nfnets_jax`. `compare_timm` starts it once,
then sends one command per line on stdin and reads one JSON line back per command, so that the
PyTorch and JAX measurements alternate in one sitting while the other side waits idle:

    setup MODEL RES BATCH THREADS DROP_RATE DROP_PATH_RATE  -> versions, parameter count
    train STEPS                                             -> per-step seconds
    infer STEPS                                             -> per-step seconds
    quit

The train step is what a timm training script does per batch: forward, cross-entropy, backward,
adaptive gradient clipping (timm's `adaptive_clip_grad`, λ = 0.01, all parameters but the
classifier, as timm's train.py applies it), then SGD with Nesterov momentum 0.9 and coupled weight
decay 2e-5. Inference is `model.eval()` under `torch.inference_mode()`. Weights are random
(nothing is downloaded). Float32, NCHW.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import platform
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Inert(type):
    """Metaclass of the stand-in classes: any attribute is another stand-in; creating one fails."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision.{cls.__name__} is a stand-in: torchvision is not installed.")


def _stub_torchvision() -> None:
    """Registers inert `torchvision` modules when the real one is missing.

    timm imports a few torchvision names at import time (FrozenBatchNorm2d, transforms, datasets)
    that the NFNet forward and backward never use; a CPU torch wheel has no matching torchvision.
    `torchvision.models` stays missing so that timm turns its FX feature extraction off.
    """
    try:
        import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        return
    except ImportError:
        pass

    def stand_in(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(attr, (), {})

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []  # a package, so that submodule imports resolve through sys.modules
        mod.__getattr__ = stand_in
        sys.modules[name] = mod
        return mod

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.datasets", "torchvision.utils"):
        module(name)
    sys.modules["torchvision"].__version__ = "stub"


class Runner:
    """One model, its optimizer and fixed random inputs; times train and inference steps."""

    def __init__(self, model: str, res: int, batch: int, threads: int, drop_rate: float, drop_path_rate: float):
        _stub_torchvision()
        import timm  # pylint: disable=import-outside-toplevel
        import torch  # pylint: disable=import-outside-toplevel
        from timm.utils import adaptive_clip_grad  # pylint: disable=import-outside-toplevel

        self.torch, self.timm, self.adaptive_clip_grad = torch, timm, adaptive_clip_grad
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.model = timm.create_model(model, pretrained=False, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.clipped = list(self.model.parameters())[:-2]  # all but head.fc weight and bias, as train.py
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=2e-5)
        self.images = torch.randn(batch, 3, res, res)
        self.labels = torch.randint(0, 1000, (batch,))
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        self.adaptive_clip_grad(self.clipped, clip_factor=0.01)
        self.optimizer.step()

    def infer_step(self) -> None:
        self.model.eval()
        with self.torch.inference_mode():
            self.model(self.images)

    def time_steps(self, step, count: int) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times

    def versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__, "timm": self.timm.__version__, "python": platform.python_version(),
                "torch_threads": str(self.torch.get_num_threads())}


def main() -> None:
    runner = None
    for line in sys.stdin:
        command, *args = line.split()
        if command == "setup":
            model, res, batch, threads, drop, drop_path = args
            runner = Runner(model, int(res), int(batch), int(threads), float(drop), float(drop_path))
            reply = {"versions": runner.versions(), "num_params": runner.num_params}
        elif command in ("train", "infer") and runner is not None:
            step = runner.train_step if command == "train" else runner.infer_step
            reply = {"times_s": runner.time_steps(step, int(args[0]))}
        elif command == "quit":
            break
        else:
            reply = {"error": f"unknown command {line.strip()!r} (or 'setup' not sent first)"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
