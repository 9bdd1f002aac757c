"""The training loop: init or resume, then steps with periodic actions, then finish.

    experiment = nfnets_jax.train.build_experiment(config)   # builder.py: config -> Experiment
    summary = nfnets_jax.train.run(experiment, workdir)      # this module

The loop never reads a config: what it needs arrives built, as `RunSettings` (seed, backend,
cadences, what to do about a non-finite step) beside the step's own `StepSettings`. Read it in
three parts, as `_TrainingRun.run` calls them:

1. **init or restore** (`_init_or_restore`): the workdir's newest intact checkpoint, or a fresh
   state from the seed (with pretrained weights for fine-tuning);
2. **steps** (`_train`): one compiled step per batch; after each, the periodic actions that are
   due, from one small table (`_PERIODIC`: log, evaluate, checkpoint, each with its cadence), and a
   stop request (SIGTERM and friends: save what is worth saving and leave);
3. **finish** (`_finish`): the final evaluation and the curves.

Tests hand `run` a fake model and in-memory batches, so the loop is tested without a real network
(scenic's fake-model pattern, `tests/fakes.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax.runtime import compile_cache, provenance, stop_signals, workdir_lock
from nfnets_jax.runtime import workdir as workdir_lib
from nfnets_jax.train import checkpointing, config_schema, evaluation, metrics_logging, parallel
from nfnets_jax.train.state import TrainState, init_train_state
from nfnets_jax.train.step import StepSettings, make_eval_step, make_train_step

NONFINITE_MODES = config_schema.NONFINITE_MODES
BACKENDS = config_schema.BACKENDS
CONFIG_FILE = "config.json"
HostBatch = Mapping[str, np.ndarray]


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf and the run's non-finite policy is 'stop'."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the loop does around the step: the run's length, cadences and policies.

    Built once from the config (`builder.run_settings_from_config`); the loop reads nothing else.

    Attributes:
      seed: initialises the params and every step's random numbers.
      backend: 'pmap' or 'shard_map' (`nfnets_jax.train.parallel`).
      total_steps: optimizer steps of the whole run (the schedule's length).
      global_batch_size: examples per step over all processes (for images/s).
      image_shape: (H, W, C) of training images, used to initialise the params.
      log_every_steps: a train record (JSONL, TensorBoard, progress line) every N steps and at the end.
      eval_every_steps: an evaluation every N steps (0: only at the end, where there always is one).
      checkpoint_every_steps: a checkpoint every N steps (and at the end, and on a stop request).
      checkpoints_kept: how many of the newest checkpoints to keep.
      nonfinite: 'stop' (raise `NonFiniteError`) or 'skip' (carry on) after a step whose loss or
        gradients were not finite; either way that update was never applied.
      config_json: the config as JSON, written to the workdir as `config.json` (None: not written).
    """

    seed: int
    backend: str
    total_steps: int
    global_batch_size: int
    image_shape: tuple[int, int, int]
    log_every_steps: int = 50
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 1000
    checkpoints_kept: int = 3
    nonfinite: str = "stop"
    config_json: str | None = None

    def __post_init__(self):
        problems = [message for ok, message in (
            (self.backend in BACKENDS, f"backend={self.backend!r}; choose one of {BACKENDS}"),
            (self.nonfinite in NONFINITE_MODES, f"nonfinite={self.nonfinite!r}; choose one of {NONFINITE_MODES}"),
            (self.total_steps > 0, f"total_steps={self.total_steps} must be > 0"),
            (self.log_every_steps > 0, f"log_every_steps={self.log_every_steps} must be > 0"),
            (self.eval_every_steps >= 0, f"eval_every_steps={self.eval_every_steps} must be >= 0"),
            (self.checkpoint_every_steps > 0 and self.checkpoints_kept > 0,
             f"checkpoint_every_steps={self.checkpoint_every_steps} and checkpoints_kept="
             f"{self.checkpoints_kept} must be > 0"),
        ) if not ok]
        if problems:
            raise ValueError("RunSettings: " + "; ".join(problems))


@dataclasses.dataclass
class Experiment:
    """What the loop needs: the model, the optimizer, the data and the settings of both.

    Attributes:
      forward: `hk.transform_with_state` of `(images, is_training) -> logits`.
      optimizer: any optax transformation: the config's chain (AGC -> weight decay -> SGD, in
        `optim.with_sam` when SAM is on) or one built in Python. Its learning rate is logged
        from its state (`optim.current_hyperparams`).
      step_settings: loss, precision, EMA and AGC-telemetry settings of the train step.
      run_settings: the loop's own settings (`RunSettings`).
      train_batches: `start_step -> iterator` of host batches `[local_devices, B, ...]`; the
        stream must be deterministic so that resuming at `start_step` continues it exactly.
      eval_batches: `() -> iterable` over one pass of the eval split (with `mask`), or None.
      describe_param_groups: `params -> str` printed at start (AGC / weight decay groups).
      initial_params: `random-init host params -> host params` for runs that start from trained
        weights (fine-tuning: keep the fresh head, load the rest); None keeps the seed's random
        init. Ignored when resuming.
    """

    forward: hk.TransformedWithState
    optimizer: optax.GradientTransformation
    step_settings: StepSettings
    run_settings: RunSettings
    train_batches: Callable[[int], Iterator[HostBatch]]
    eval_batches: Callable[[], Any] | None
    describe_param_groups: Callable[[hk.Params], str] | None = None
    initial_params: Callable[[Any], hk.Params] | None = None


@dataclasses.dataclass
class RunSummary:
    """Where a run ended, what it left in the workdir, and its metrics as data.

    Attributes:
      history: every record this call wrote to `metrics_file`, in order, as dicts
        `{"step": 100, "split": "train" | "eval", "loss": ..., ...}` of Python floats.
      state: the final `TrainState` (replicated device arrays; `parallel.first_replica` gives a
        host copy).
    """

    step: int
    stopped_by: str  # 'completed' | 'preempted' (a stop signal) | 'num_steps'
    eval_metrics: dict[str, float]
    checkpoint_dir: str
    metrics_file: str
    plot_file: str | None
    skipped_steps: int
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    state: TrainState | None = None
    stop_signal: int | None = None  # the signal that stopped a 'preempted' run

    def series(self, name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric of `history`, e.g. `summary.series("loss")`."""
        points = [(r["step"], r[name]) for r in self.history if r["split"] == split and name in r]
        return np.asarray([p[0] for p in points], np.int64), np.asarray([p[1] for p in points], np.float64)


def initializer(experiment: Experiment) -> Callable[..., TrainState]:
    """`(initial_params=None) -> TrainState`: the run's state at step 0 from its seed (pure: jit
    it, or `jax.eval_shape` it for the shapes a checkpoint of this run holds)."""
    settings = experiment.run_settings
    return functools.partial(
        init_train_state, experiment.forward, experiment.optimizer, seed=settings.seed,
        sample_images=jnp.zeros((1, *settings.image_shape), jnp.float32),
        use_ema=experiment.step_settings.ema_decay is not None)


def run(experiment: Experiment, workdir: str, *, num_steps: int | None = None,
        progress_bar: bool | None = None, verbose: bool = True, prefetch: int = 2) -> RunSummary:
    """Trains `experiment` in `workdir`, resuming from its latest checkpoint; returns the summary,
    metrics history included (`summary.history`, `summary.series("loss")`).

    Writes what `python -m experiments.train` writes: `config.json`, `provenance.json`,
    `metrics.jsonl`, TensorBoard events, checkpoints and the curves PNG; nothing in the workdir is
    read or written before this run holds the workdir's lock.

    Args:
      experiment: from `build_experiment` (or built by hand, e.g. with a fake model in tests).
      workdir: a local folder or a `gs://` URL; a workdir with checkpoints is resumed.
      num_steps: stop this call after that many steps (at most to the end of the schedule), with
        a checkpoint and an evaluation, so a notebook can train in pieces; the next call resumes.
      progress_bar: True (a tqdm bar), False (plain lines), None (a bar in notebooks and terminals).
      verbose: False leaves out the parameter-group table and the per-eval lines.
      prefetch: batches placed on device ahead of the step.
    """
    if num_steps is not None and not num_steps > 0:
        raise ValueError(f"num_steps must be a positive number of steps (or None: to the end), got {num_steps}.")
    lock = workdir_lock.acquire_for_run(workdir)
    try:
        return _TrainingRun(experiment, workdir_lib.as_path(workdir), num_steps=num_steps, prefetch=prefetch,
                            progress_bar=progress_bar, verbose=verbose).run()
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass(frozen=True)
class _Periodic:
    """An action the loop takes every `every` steps (never if 0), and at the last step if `at_end`."""

    name: str
    every: Callable[[RunSettings], int]
    at_end: bool

    def due(self, settings: RunSettings, step: int, end_step: int) -> bool:
        every = self.every(settings)
        return (every > 0 and step % every == 0) or (self.at_end and step == end_step)


# The periodic actions, in the order they run after a step. (The final evaluation is the finish's.)
_PERIODIC = (
    _Periodic("log", lambda s: s.log_every_steps, at_end=True),
    _Periodic("checkpoint", lambda s: s.checkpoint_every_steps, at_end=True),
    _Periodic("eval", lambda s: s.eval_every_steps, at_end=False),
)


class _TrainingRun:
    """One call of `run`, in a workdir whose lock it holds."""

    def __init__(self, experiment: Experiment, workdir: workdir_lib.Path, *, num_steps: int | None,
                 prefetch: int, progress_bar: bool | None, verbose: bool):
        self.experiment = experiment
        self.settings = experiment.run_settings
        self.workdir = workdir
        self.num_steps = num_steps
        self.prefetch = prefetch
        self.progress_bar = progress_bar
        self.verbose = verbose
        self.is_main = jax.process_index() == 0
        self.backend = parallel.make_backend(self.settings.backend)
        self.history: list[dict[str, Any]] = []
        self.skipped = 0
        self.pending: tuple[int, Any] | None = None  # the last step's metrics, checked one step late

    def run(self) -> RunSummary:
        compile_cache.enable_for_workdir(self.workdir)  # a resumed run reads its compiled step from disk
        # Stop signals are ours from here: until the first step is taken there is nothing to save,
        # and a signal ends the process at once (stop_signals).
        with stop_signals.StopRequests() as self.stop_requests:
            self.checkpointer = checkpointing.Checkpointer(
                self.workdir / checkpointing.CHECKPOINTS_FOLDER,
                every_steps=self.settings.checkpoint_every_steps, keep=self.settings.checkpoints_kept)
            try:
                state, resumed = self._init_or_restore()
            except BaseException:
                self.checkpointer.close()
                raise
            self._open_outputs(state, resumed)
            try:
                state, step, stopped_by, eval_metrics = self._train(state)
            except NonFiniteError:
                self._draw_curves()  # the curves up to the bad step are what the user looks at next
                raise
            finally:
                self.checkpointer.close()
                self.progress.close()
                self.writer.close()
        # After a stop request every second of the notice counts: the next run draws the curves.
        plot_file = self._draw_curves() if stopped_by == "completed" else None
        return RunSummary(step=step, stopped_by=stopped_by, eval_metrics=eval_metrics,
                          checkpoint_dir=self.checkpointer.directory, metrics_file=self.writer.jsonl_path,
                          plot_file=plot_file, skipped_steps=self.skipped, history=self.history, state=state,
                          stop_signal=self.stop_requests.signum if stopped_by == "preempted" else None)

    # ---- 1. init or restore -------------------------------------------------------------------------

    def _init_or_restore(self) -> tuple[TrainState, bool]:
        """(state, whether it was restored): the newest intact checkpoint, or step 0 from the seed."""
        init_fn = initializer(self.experiment)
        abstract_state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.backend.replicated),
            jax.eval_shape(init_fn))
        restored = self.checkpointer.restore_latest(abstract_state)
        if restored is not None:
            return restored[0], True
        state = _run_once(init_fn, out_shardings=self.backend.replicated)
        if self.experiment.initial_params is not None:  # fine-tuning: loaded body, the fresh head
            initial_params = self.experiment.initial_params(parallel.first_replica(state.params))
            state = _run_once(lambda p: init_fn(initial_params=p), initial_params,
                              out_shardings=self.backend.replicated)
        return state, False

    def _open_outputs(self, state: TrainState, resumed: bool) -> None:
        """The workdir's records of this run, the metric writer and the progress display."""
        step = int(parallel.first_replica(state.step))
        if self.is_main:
            # The records of steps after the resumed one are logged again by this run: drop them.
            metrics_logging.trim_metrics(self.workdir / metrics_logging.METRICS_FILE, last_step=step)
            if self.settings.config_json is not None:
                workdir_lib.write_text_atomically(self.workdir / CONFIG_FILE, self.settings.config_json)
            provenance.write(self.workdir)  # versions, git commit, devices: what produced this workdir
        self.writer = metrics_logging.MetricWriter(self.workdir, is_main=self.is_main,
                                                   resumed_at=step if resumed else None)
        self.progress = metrics_logging.Progress(self.settings.total_steps, step, is_main=self.is_main,
                                                 bar=self.progress_bar)
        if resumed:
            self.progress.message(f"Resumed from {self.checkpointer.directory} at step {step}.")
        if self.experiment.describe_param_groups is not None and step == 0 and self.verbose:
            self.progress.message(self.experiment.describe_param_groups(parallel.first_replica(state.params)))

    # ---- 2. steps and periodic actions ---------------------------------------------------------------

    def _train(self, state: TrainState) -> tuple[TrainState, int, str, dict[str, float]]:
        """Steps until the end (or `num_steps`, or a stop request); (state, step, stopped_by,
        last evaluation)."""
        experiment, settings = self.experiment, self.settings
        train_fn = self.backend.wrap_train(
            make_train_step(experiment.forward, experiment.optimizer, experiment.step_settings))
        self.eval_fn = self.backend.wrap_eval(make_eval_step(experiment.forward))
        step = start_step = int(parallel.first_replica(state.step))
        end_step = settings.total_steps if self.num_steps is None else min(settings.total_steps,
                                                                           step + self.num_steps)
        from nfnets_jax.data import feeding  # pylint: disable=import-outside-toplevel
        # The next batches are placed on device while the current step runs, from a daemon thread,
        # so that a stop request never waits for the input pipeline.
        batches = feeding.BackgroundBatches(experiment.train_batches(step), self.prefetch,
                                            self.backend.put_batch)
        self.timer = metrics_logging.StepTimer(settings.global_batch_size)
        eval_metrics: dict[str, float] = {}
        stopped_by = "completed"
        watcher = self.stop_requests
        try:
            # Single process: a stop request also ends the wait for a slow batch (the save is
            # then of the last completed step). Multi-process runs agree on a step boundary.
            stop_while_waiting = ((lambda: watcher.should_stop(step)) if jax.process_count() == 1
                                  else None)
            while step < end_step:
                batch = batches.get(stop_while_waiting)
                if batch is None:  # a stop request while waiting for data
                    self._settle_pending()
                    if self.checkpointer.latest_step() != step:
                        self._save(step, state)
                    stopped_by = self._stopped(step)
                    break
                state, metrics = train_fn(state, batch)
                step += 1
                self.timer.tick()
                if step == start_step + 1:
                    # The first step includes compilation: time it on its own (one sync, once)
                    # so that later step times and the ETA leave it out.
                    jax.block_until_ready(metrics)
                    # From now on a stop saves this run's steps. Marked before the line that
                    # announces the step: a signal sent on reading it must find the mark set.
                    watcher.nothing_to_lose(False)
                    self.progress.message(
                        f"First step (compilation included): {self.timer.read_and_reset()[0]:.1f}s")
                due = {action.name for action in _PERIODIC if action.due(settings, step, end_step)}
                stop_requested = watcher.should_stop(step)
                # Check the previous step while this one runs (no sync inside the step); check
                # this one now if anything reads or saves the state.
                self._settle_pending()
                self.pending = (step, metrics)
                if due or stop_requested:
                    self._settle_pending()
                if "log" in due:
                    self._log(step, metrics)
                if "checkpoint" in due or stop_requested:
                    self._save(step, state)
                if stop_requested:
                    stopped_by = self._stopped(step)
                    break
                if "eval" in due and step != end_step:
                    with self.timer.paused():  # the next step time and ETA leave the eval out
                        eval_metrics = self._evaluate(step, state)
            self._settle_pending()
            if stopped_by == "completed":
                stopped_by = "completed" if step >= settings.total_steps else "num_steps"
                eval_metrics = self._evaluate(step, state)  # ---- 3. finish
        finally:
            batches.close()
        return state, step, stopped_by, eval_metrics

    def _settle_pending(self) -> None:
        """Checks the pending step's on-device non-finite flag (one host sync), if any."""
        if self.pending is None:
            return
        at_step, metrics = self.pending
        self.pending = None
        if float(parallel.first_replica(metrics["nonfinite"])) == 0.0:
            return
        if self.settings.nonfinite == "stop":
            last = self.checkpointer.latest_step()
            raise NonFiniteError(
                f"Non-finite loss or gradients at step {at_step}: stopping. The update was not "
                f"applied and no checkpoint was written after it (last good checkpoint: "
                f"{'none' if last is None else f'step {last}'} in {self.checkpointer.directory}). "
                "Lower config.optimizer.lr, check config.optimizer.agc.clipping, or set "
                "config.nonfinite='skip' to skip such updates instead.")
        self.skipped += 1
        self.progress.message(f"Non-finite loss or gradients at step {at_step}: update skipped.")

    def _log(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        seconds_per_step, images_per_second = self.timer.read_and_reset()
        host = parallel.first_replica(metrics)
        self._record(step, "train", {**host, "step_time": seconds_per_step,
                                     "images_per_second": images_per_second, "skipped_steps": self.skipped})
        self.progress.update(step, loss=float(host["loss"]), images_per_second=images_per_second,
                             seconds_per_step=seconds_per_step)

    def _save(self, step: int, state: TrainState) -> None:
        with self.timer.paused():
            self.checkpointer.save(step, self.backend.to_global(state))

    def _stopped(self, step: int) -> str:
        self.progress.message(f"{self.stop_requests.name}: saved step {step} to {self.checkpointer.directory}; "
                              "exiting.")
        return "preempted"

    def _evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        if self.experiment.eval_batches is None:
            return {}
        results = evaluation.evaluate_raw_and_ema(self.eval_fn, state, self.experiment.eval_batches,
                                                  self.backend.put_batch)
        self._record(step, "eval", results)
        if self.verbose:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "num_examples")
            self.progress.message(f"eval @ step {step}: {shown}")
        return results

    def _record(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        """Writes a record (JSONL, TensorBoard) and keeps it for the returned history."""
        self.writer.write(step, split, scalars)
        self.history.append({"step": int(step), "split": split,
                             **{name: float(np.asarray(value)) for name, value in scalars.items()}})

    def _draw_curves(self) -> str | None:
        """The PNG of the training curves so far (process 0), from the flushed JSONL file."""
        if not self.is_main or not workdir_lib.as_path(self.writer.jsonl_path).exists():
            return None
        return metrics_logging.plot_training_curves(self.writer.jsonl_path,
                                                    self.workdir / metrics_logging.CURVES_FILE)


def _run_once(fn: Callable, *args: Any, out_shardings: Any) -> Any:
    """`jax.jit(fn)(*args)` for a function that runs once per run (the init).

    On CPU it is compiled without LLVM's optimisations: they spend most of the init's compile
    time on its unrolled random-number generators (one per parameter) and gain nothing for a
    single call. The integer bits are the same; a float may differ by one ulp (no fused
    multiply-adds), and every run, fresh or resumed, takes this same path.
    """
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(*args)
