"""What a run tells its user: a progress line, TensorBoard events, a JSONL file, a PNG of curves.

Named `metrics_logging` so as not to shadow the standard library's `logging`. Only process 0
writes files (`is_main`); every process computes the same metrics, which are averaged on device
before they reach the host. Files go through `workdir.as_path`, so a `gs://` workdir works too.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
from etils import epath

from nfnets_jax.runtime import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


def format_duration(seconds: float) -> str:
    """`3725` -> `'1h02m05s'`; for ETAs in the progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def trim_metrics(jsonl_path: str | epath.Path, *, last_step: int) -> int:
    """Drops the records of steps after `last_step` (and a line cut short by a kill), so that a
    run resumed from the checkpoint of `last_step` logs each later step once. The file is
    replaced atomically. Returns the number of records dropped."""
    path = workdir_lib.as_path(jsonl_path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if int(record.get("step", 0)) > last_step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        workdir_lib.write_text_atomically(path, "".join(kept))
    return dropped


class _EpathEventFiles:
    """tensorboardX writer factory for workdirs on object stores (`gs://`), through epath."""

    def open(self, path: str) -> IO[bytes]:
        return workdir_lib.as_path(path).open("wb")

    def directory_check(self, path: str) -> None:
        workdir_lib.as_path(path).mkdir(parents=True, exist_ok=True)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and to TensorBoard event files in `workdir/tb`.

    One JSON object per line: `{"step": 100, "split": "train", "loss": 0.52, ...}`, flushed at
    once, so a crashed run keeps everything written before the crash and a resumed run appends
    (after `trim_metrics` removed what it will log again). `resumed_at` makes TensorBoard drop
    the events of later steps, for the same reason.
    """

    def __init__(self, workdir: str | epath.Path, *, is_main: bool, resumed_at: int | None = None):
        self.is_main = is_main
        directory = workdir_lib.as_path(workdir)
        self.jsonl_path = str(directory / METRICS_FILE)
        self._jsonl: IO[str] | None = None
        self._tensorboard = None
        if is_main:
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = (directory / METRICS_FILE).open("a")
            # pylint: disable=import-outside-toplevel
            from tensorboardX import SummaryWriter
            from tensorboardX import record_writer

            if workdir_lib.is_url(directory):
                record_writer.register_writer_factory(str(directory).split(":")[0], _EpathEventFiles())
            self._tensorboard = SummaryWriter(
                str(directory / "tb"), purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (host floats or device scalars) for `split` at `step`."""
        if not self.is_main:
            return
        values = {name: _scalar(value) for name, value in scalars.items()}
        record = {"step": int(step), "split": split, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _in_jupyter_kernel() -> bool:
    """True inside a running IPython kernel (a notebook), where stdout is not a terminal.

    Merely importing ipykernel (as a test runner that executes notebooks does) is not enough: the
    process must be the kernel itself.
    """
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Progress:
    """Step, loss, images/s and ETA: a tqdm bar on a terminal, plain lines otherwise.

    Plain lines (one per log interval) keep CI logs and `nohup` files readable, where a bar's
    carriage returns would not be. `bar`: True for a bar, False for lines, None (default) for a
    bar on a terminal or in a Jupyter kernel (tqdm.auto: a widget when ipywidgets is installed).
    """

    def __init__(self, total_steps: int, start_step: int, *, is_main: bool, stream: IO[str] | None = None,
                 bar: bool | None = None):
        self.total_steps = total_steps
        self.is_main = is_main
        self.stream = stream or sys.stdout
        self._bar = None
        if bar is None:
            bar = self.stream.isatty() or _in_jupyter_kernel()
        if is_main and bar:
            import warnings  # pylint: disable=import-outside-toplevel

            with warnings.catch_warnings():  # tqdm.auto warns when it falls back to a text bar
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream,
                             dynamic_ncols=True)
        self._last_step = start_step

    def update(self, step: int, *, loss: float, images_per_second: float, seconds_per_step: float) -> None:
        if not self.is_main:
            return
        eta = format_duration((self.total_steps - step) * seconds_per_step)
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix_str(f"loss {loss:.4f}  {images_per_second:,.0f} img/s  ETA {eta}")
        else:
            print(f"step {step}/{self.total_steps}  loss {loss:.4f}  {images_per_second:,.0f} img/s  "
                  f"ETA {eta}", file=self.stream, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def read_metrics(jsonl_path: str | epath.Path) -> list[dict]:
    """All records of a metrics file, in order."""
    return [json.loads(line) for line in workdir_lib.as_path(jsonl_path).read_text().splitlines()
            if line.strip()]


def plot_training_curves(jsonl_path: str | epath.Path, png_path: str | epath.Path) -> str:
    """Draws train loss, train/eval top-1, learning rate and AGC clip fraction against step.

    Returns the path written. Draws on a standalone `Figure` (no display needed, and pyplot's
    backend is left as the caller set it).
    """
    # A Figure of its own, not pyplot: switching pyplot's backend to Agg here would leave a
    # notebook that ran training without inline plots.
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    records = read_metrics(jsonl_path)

    def series(split: str, name: str) -> tuple[list[int], list[float]]:
        points = sorted((r["step"], r[name]) for r in records if r["split"] == split and name in r)
        return [s for s, _ in points], [v for _, v in points]

    panels = [
        ("loss", [("train", "loss", "train"), ("eval", "loss", "eval"), ("eval", "ema_loss", "eval EMA")]),
        ("top-1 accuracy", [("train", "top_1_acc", "train"), ("eval", "top_1_acc", "eval"),
                            ("eval", "ema_top_1_acc", "eval EMA")]),
        ("learning rate", [("train", "learning_rate", "lr")]),
        ("AGC clip fraction", [("train", "agc/clip_fraction", "global")]),
    ]
    fig = Figure(figsize=(4.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels))
    for axis, (title, lines) in zip(axes, panels):
        for split, name, label in lines:
            steps, values = series(split, name)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    workdir_lib.as_path(png_path).write_bytes(image.getvalue())
    return str(png_path)


class StepTimer:
    """Wall time per step and images/s over the last interval (the last reading if none passed)."""

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size
        self._time = time.perf_counter()
        self._steps = 0
        self._last = (float("nan"), float("nan"))

    def tick(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time spent inside (an evaluation, a checkpoint save) out of the step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._time += time.perf_counter() - start

    def read_and_reset(self) -> tuple[float, float]:
        """Returns (seconds per step, images per second) since the last call."""
        now = time.perf_counter()
        if self._steps:
            elapsed = max(now - self._time, 1e-9)
            self._last = (elapsed / self._steps, self._steps * self.global_batch_size / elapsed)
        self._time, self._steps = now, 0
        return self._last
