"""The training loop: init or resume, step, log, evaluate, checkpoint, stop cleanly.

`experiments/train.py` builds an `Experiment` (model, optimizer, data) from the config and hands
it to `run`; tests hand `run` a fake model and in-memory batches, so the loop is tested without a
real network (scenic's fake-model pattern).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nfnets_jax import provenance
from nfnets_jax.train import checkpointing
from nfnets_jax.train import compile_cache
from nfnets_jax.train import config_schema
from nfnets_jax.train import evaluation
from nfnets_jax.train import metrics_logging
from nfnets_jax.train import parallel
from nfnets_jax.train import workdir as workdir_lib
from nfnets_jax.train import workdir_lock
from nfnets_jax.train.state import TrainState, init_train_state
from nfnets_jax.train.step import StepSettings, make_eval_step, make_train_step

NONFINITE_MODES = config_schema.NONFINITE_MODES
CONFIG_FILE = "config.json"
HostBatch = Mapping[str, np.ndarray]


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf and `config.nonfinite == 'stop'`."""


@dataclasses.dataclass
class Experiment:
    """What the loop needs that depends on the model and the data.

    Attributes:
      forward: `hk.transform_with_state` of `(images, is_training) -> logits`.
      optimizer: any optax transformation: the config's chain (AGC -> weight decay -> SGD, in
        `optim.with_sam` when SAM is on) or one built in Python. Its learning rate is logged
        from its state (`optim.current_hyperparams`).
      step_settings: loss, precision, EMA and AGC-telemetry settings of the train step.
      train_batches: `start_step -> iterator` of host batches `[local_devices, B, ...]`; the
        stream must be deterministic so that resuming at `start_step` continues it exactly.
      eval_batches: `() -> iterable` over one pass of the eval split (with `mask`), or None.
      image_shape: (H, W, C) of training images, used to initialise the params.
      total_steps: the number of optimizer steps of the whole run.
      global_batch_size: examples per step over all processes (for images/s).
      describe_param_groups: `params -> str` printed at start (AGC / weight decay groups).
      initial_params: `random-init host params -> host params` for runs that start from trained
        weights (fine-tuning: keep the fresh head, load the rest); None keeps the seed's random
        init. Ignored when resuming.
      config: the experiment config it was built from (`nfnets_jax.train.run` reads the seed,
        backend and logging intervals there), or None.
    """

    forward: hk.TransformedWithState
    optimizer: optax.GradientTransformation
    step_settings: StepSettings
    train_batches: Callable[[int], Iterator[HostBatch]]
    eval_batches: Callable[[], Any] | None
    image_shape: tuple[int, int, int]
    total_steps: int
    global_batch_size: int
    describe_param_groups: Callable[[hk.Params], str] | None = None
    initial_params: Callable[[Any], hk.Params] | None = None
    config: ml_collections.ConfigDict | None = None


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
    stopped_by: str  # 'completed' | 'preempted' | 'num_steps'
    eval_metrics: dict[str, float]
    checkpoint_dir: str
    metrics_file: str
    plot_file: str | None
    skipped_steps: int
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    state: TrainState | None = None

    def series(self, name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric of `history`, e.g. `summary.series("loss")`."""
        points = [(r["step"], r[name]) for r in self.history if r["split"] == split and name in r]
        return np.asarray([p[0] for p in points], np.int64), np.asarray([p[1] for p in points], np.float64)


def _abstract(state: TrainState, sharding: jax.sharding.Sharding) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


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


def _prefetch(batches: Iterator[HostBatch], put_batch: Callable, size: int):
    """Places the next `size` batches on device while the current step runs, from a daemon
    thread, so that a stop request never waits for the input pipeline (feeding.BackgroundBatches)."""
    from nfnets_jax.data import feeding  # pylint: disable=import-outside-toplevel

    return feeding.BackgroundBatches(batches, size, put_batch)


def run(experiment: Experiment, config: ml_collections.ConfigDict, workdir: str,
        *, prefetch: int = 2, num_steps: int | None = None, progress_bar: bool | None = None,
        verbose: bool = True) -> RunSummary:
    """Trains `experiment` as `config` says, in `workdir`, resuming from its latest checkpoint.

    Reads `config.train.seed`, `config.parallel.backend`, `config.checkpoint.every_steps/keep`,
    `config.eval.every_steps`, `config.log.every_steps` and `config.nonfinite`.

    `num_steps` stops this call after that many steps (at most to the end of the schedule,
    `experiment.total_steps`), with a checkpoint and an evaluation, so a notebook can train in
    pieces; the next call resumes there. `progress_bar`: a tqdm bar (True), plain lines (False)
    or a bar on terminals and notebooks only (None). `verbose=False` leaves out the parameter
    group table and the per-eval lines.
    """
    if config.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE_MODES}.")
    if num_steps is not None and not num_steps > 0:
        raise ValueError(f"num_steps must be a positive number of steps (or None: to the end), got {num_steps}.")
    is_main = jax.process_index() == 0
    # Nothing in the workdir is read or written before this run holds its lock.
    lock = workdir_lock.acquire_for_run(workdir)
    try:
        return _run_locked(experiment, config, workdir_lib.as_path(workdir), is_main, prefetch=prefetch,
                           num_steps=num_steps, progress_bar=progress_bar, verbose=verbose)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(experiment: Experiment, config: ml_collections.ConfigDict, workdir: workdir_lib.Path,
                is_main: bool, *, prefetch: int, num_steps: int | None, progress_bar: bool | None,
                verbose: bool) -> RunSummary:
    compile_cache.enable_for_workdir(workdir)  # a resumed run reads its compiled step from disk
    backend = parallel.make_backend(config.parallel.backend)
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints",
        every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep,
    )

    # ---- State: resume from the workdir's latest checkpoint, or initialise from the seed ----
    init_fn = functools.partial(
        init_train_state,
        experiment.forward,
        experiment.optimizer,
        seed=config.train.seed,
        sample_images=jnp.zeros((1, *experiment.image_shape), jnp.float32),
        use_ema=experiment.step_settings.ema_decay is not None,
    )
    abstract_state = _abstract(jax.eval_shape(init_fn), backend.replicated)
    try:
        restored = checkpointer.restore_latest(abstract_state)
    except BaseException:
        checkpointer.close()
        raise
    if restored is None:
        state = _run_once(init_fn, out_shardings=backend.replicated)
        if experiment.initial_params is not None:  # fine-tuning: loaded body, the fresh head
            initial_params = experiment.initial_params(parallel.first_replica(state.params))
            state = _run_once(lambda p: init_fn(initial_params=p), initial_params,
                              out_shardings=backend.replicated)
        data_position = 0
    else:
        state, meta = restored
        data_position = int(meta["data_position"])
    resumed_at = int(parallel.first_replica(state.step))
    if is_main:
        # The records of steps after the resumed one are logged again by this run: drop them.
        metrics_logging.trim_metrics(workdir / metrics_logging.METRICS_FILE, last_step=resumed_at)
        workdir_lib.write_text_atomically(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))
        provenance.write(workdir)  # versions, git commit, devices: what produced this workdir
    writer = metrics_logging.MetricWriter(workdir, is_main=is_main,
                                          resumed_at=None if restored is None else resumed_at)
    step = start_step = int(parallel.first_replica(state.step))
    end_step = experiment.total_steps if num_steps is None else min(experiment.total_steps, step + num_steps)
    progress = metrics_logging.Progress(experiment.total_steps, step, is_main=is_main, bar=progress_bar)
    if restored is not None:
        progress.message(f"Resumed from {checkpointer.directory} at step {step}.")
    if experiment.describe_param_groups is not None and step == 0 and verbose:
        progress.message(experiment.describe_param_groups(parallel.first_replica(state.params)))

    # ---- Compiled steps ----
    train_fn = backend.wrap_train(
        make_train_step(experiment.forward, experiment.optimizer, experiment.step_settings))
    eval_fn = backend.wrap_eval(make_eval_step(experiment.forward))

    def run_eval(at_step: int) -> dict[str, float]:
        if experiment.eval_batches is None:
            return {}
        results = evaluation.evaluate_raw_and_ema(
            eval_fn, state, experiment.eval_batches, backend.put_batch)
        record(at_step, "eval", results)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "num_examples")
        if verbose:
            progress.message(f"eval @ step {at_step}: {shown}")
        return results

    history: list[dict[str, Any]] = []

    def record(at_step: int, split: str, scalars: Mapping[str, Any]) -> None:
        """Writes a record (JSONL, TensorBoard) and keeps it for the returned history."""
        writer.write(at_step, split, scalars)
        history.append({"step": int(at_step), "split": split,
                        **{name: float(np.asarray(value)) for name, value in scalars.items()}})

    def check_finite(at_step: int, metrics: Mapping[str, jax.Array]) -> bool:
        """Host check of one step's on-device flag; the state never took a non-finite update."""
        if float(parallel.first_replica(metrics["nonfinite"])) == 0.0:
            return True
        if config.nonfinite == "stop":
            last = checkpointer.latest_step()
            raise NonFiniteError(
                f"Non-finite loss or gradients at step {at_step}: stopping. The update was not "
                f"applied and no checkpoint was written after it (last good checkpoint: "
                f"{'none' if last is None else f'step {last}'} in {checkpointer.directory}). "
                "Lower config.optimizer.lr, check config.optimizer.agc.clipping, or set "
                "config.nonfinite='skip' to skip such updates instead."
            )
        progress.message(f"Non-finite loss or gradients at step {at_step}: update skipped.")
        return False

    def draw_curves() -> str | None:
        """The PNG of the training curves so far (process 0), from the flushed JSONL file."""
        if not is_main or not workdir_lib.as_path(writer.jsonl_path).exists():
            return None
        return metrics_logging.plot_training_curves(writer.jsonl_path, workdir / metrics_logging.CURVES_FILE)

    # ---- Loop ----
    batches = _prefetch(experiment.train_batches(data_position), backend.put_batch, prefetch)
    timer = metrics_logging.StepTimer(experiment.global_batch_size)
    skipped = 0
    eval_metrics: dict[str, float] = {}
    stopped_by = "completed"
    pending: tuple[int, Any] | None = None  # the previous step's metrics, checked one step late
    try:
        with checkpointing.PreemptionWatcher() as watcher:
            # Single process: a SIGTERM also ends the wait for a slow batch (the save is then of
            # the last completed step). Multi-process runs agree on a step boundary instead.
            stop_while_waiting = ((lambda: watcher.should_stop(step)) if jax.process_count() == 1
                                  else None)
            while step < end_step:
                batch = batches.get(stop_while_waiting)
                if batch is None:
                    if pending is not None and not check_finite(*pending):
                        skipped += 1
                    pending = None
                    if checkpointer.latest_step() != step:
                        with timer.paused():
                            checkpointer.save(step, backend.to_global(state), data_position=step)
                    stopped_by = "preempted"
                    progress.message(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting.")
                    break
                state, metrics = train_fn(state, batch)
                step += 1
                timer.tick()
                if step == start_step + 1:
                    # The first step includes compilation: time it on its own (one sync, once) so
                    # that later step times and the ETA leave it out.
                    jax.block_until_ready(metrics)
                    progress.message(f"First step (compilation included): {timer.read_and_reset()[0]:.1f}s")
                # Check the previous step while this one runs (no sync inside the step).
                if pending is not None and not check_finite(*pending):
                    skipped += 1
                pending = (step, metrics)
                at_log = step % config.log.every_steps == 0 or step == end_step
                at_eval = config.eval.every_steps > 0 and step % config.eval.every_steps == 0
                at_ckpt = step % checkpointer.every_steps == 0 or step == end_step
                preempted = watcher.should_stop(step)
                if at_log or at_eval or at_ckpt or preempted:
                    if not check_finite(*pending):
                        skipped += 1
                    pending = None
                if at_log:
                    seconds_per_step, images_per_second = timer.read_and_reset()
                    host = parallel.first_replica(metrics)
                    record(step, "train", {**host, "step_time": seconds_per_step,
                                           "images_per_second": images_per_second,
                                           "skipped_steps": skipped})
                    progress.update(step, loss=float(host["loss"]), images_per_second=images_per_second,
                                    seconds_per_step=seconds_per_step)
                if at_ckpt or preempted:
                    with timer.paused():
                        checkpointer.save(step, backend.to_global(state), data_position=step)
                if preempted:
                    stopped_by = "preempted"
                    progress.message(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting.")
                    break
                if at_eval and step != end_step:
                    with timer.paused():  # the next step time and ETA leave the eval out
                        eval_metrics = run_eval(step)
            if pending is not None and not check_finite(*pending):
                skipped += 1
        if stopped_by == "completed":
            if step < experiment.total_steps:
                stopped_by = "num_steps"
            eval_metrics = run_eval(step)
    except NonFiniteError:
        draw_curves()  # the curves up to the bad step are what the user looks at next
        raise
    finally:
        batches.close()
        checkpointer.close()
        progress.close()
        writer.close()

    # After a SIGTERM every second of the notice counts: the next run draws the curves.
    plot_file = draw_curves() if stopped_by == "completed" else None
    return RunSummary(step=step, stopped_by=stopped_by, eval_metrics=eval_metrics,
                      checkpoint_dir=checkpointer.directory, metrics_file=writer.jsonl_path,
                      plot_file=plot_file, skipped_steps=skipped, history=history, state=state)
