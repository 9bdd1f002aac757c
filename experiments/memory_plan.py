"""Memory of every config's train step per device, before launching: does it fit, with or without remat?

For each config (NFNet F0–F7 and F0+–F7+, NF-ResNets, NF-RegNets) it compiles the runner's real
train step (`nfnets_jax.train.one_device_step`: model, loss, gradients, AGC, weight decay, SGD, EMA,
in the recipe's compute dtype) for ONE device at the recipe's per-device batch, from shapes only —
no array is allocated — and prints XLA's memory analysis of the compiled program: arguments (the
train state and the batch), outputs, temporaries (activations kept for the backward pass and
scratch), and their peak sum, then which accelerators it fits. With `--remat both` (the default)
every config is compiled a second time with `hk.remat` around every block (`config.train.remat`)
and the table shows what that saves, and what it costs: XLA's FLOP count of the step, whose growth
is the recomputed forward (on an accelerator, `--time_steps N` also times both versions).

    python -m experiments.memory_plan                                  # every config (slow on a CPU)
    python -m experiments.memory_plan --only nfnet.py:F0,nfnet.py:F6   # some configs
    python -m experiments.memory_plan --only nfnet.py:F6 --per_device_batch 16 --remat on
    python -m experiments.memory_plan --target tpu-v3 --only nfnet.py:F7       # the TPU compiler's plan
    python -m experiments.memory_plan --target tpu-v3 --config=configs/nfnet.py:F3 \
        --config.data.image_size=288 --remat off              # one config, with any overrides

How to read it: the figures are those of the compiler that compiles. By default that is the
backend JAX runs on here (on a laptop or CI, XLA:CPU, whose plan came out 1.7–1.8× XLA:GPU's for
F0–F2: an upper bound). `--target tpu-v3` (or `tpu-v4`, `tpu-v5e`, `tpu-v5p`, `tpu-v6e`) compiles for one
device of that TPU generation *without* a TPU, through `jax.experimental.topologies` and libtpu's
compiler (ahead-of-time, "deviceless"): the figures are then the TPU compiler's own plan, exact up
to what the runtime adds (keep the 10% headroom the "fits" column asks for). It needs libtpu
(`pip install -c requirements/lock.txt -e ".[tpu-plan]"`, ~140 MB; nothing else changes) and,
since it only compiles, no TPU and no network; but it needs the host RAM of the TPU compiler,
which grows with the model (F3's compile peaked near 11 GB, F5's passed 16 GB on a 24 GB host). Per-device batch: the global `config.train.batch_size` over `RECIPE_DEVICES` devices
(NFNets: 4096 over the 128 TPUv3 cores of the paper, 32 each).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time

from absl import flags

from nfnets_jax.train import config_files  # (no jax)

from . import command_line

CONFIGS = config_files.configs_folder()

# Accelerator memory per device (GiB) that a step may use.
ACCELERATORS: dict[str, float] = {
    "TPUv3 16G": 16.0,
    "TPUv4 32G": 32.0,
    "A100 40G": 40.0,
    "A100 80G": 80.0,
    "H100 80G": 80.0,
    "H200 141G": 131.3,  # 141 GB = 131.3 GiB
}
HEADROOM = 0.9  # "fits" = the step's peak is at most 90% of the device (runtime, fragmentation)

# Devices the recipe's global batch is spread over (config file -> devices), giving the per-device
# batch: NFNets and the NF-ResNet study use 4096 over 128 TPUv3 cores (32 each, the paper's
# setting); the NF-RegNet recipe's 1024 over 8 devices ("8 GPUs or a TPU v3-8", its config).
RECIPE_DEVICES = {"nfnet.py": 128, "nf_resnet.py": 128, "nf_regnet.py": 8}




@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU generation to compile for without one: a topology `jax.experimental.topologies` knows."""

    topology: str  # its name for `get_topology_desc`; the plan compiles for the topology's first device
    label: str
    # Dense bf16 peak of that one device (TFLOP/s, Google Cloud's TPU system-architecture pages):
    # a floor under any run-time estimate (`benchmarks.tpu_step_estimate` checks it).
    peak_bf16_tflops: float
    hbm_gib: float  # HBM of that one device, which the step must fit (with HEADROOM)
    options: tuple[tuple[str, str], ...] = ()  # further `get_topology_desc` options, as (name, value)


# One JAX device is a TPUv3 *core* (the paper's 128 devices), and a whole chip on v4/v5e/v5p/v6e.
# A TPUv4 chip's two cores run as one device ("megacore", 32 GiB) on a v4 host, but libtpu's
# deviceless v4 topology lists them as separate 16 GiB devices unless asked for megacore chips.
TPU_TARGETS: dict[str, TpuTarget] = {
    "tpu-v3": TpuTarget("v3:2x2", "TPUv3 core", 123.0 / 2, 16.0),
    "tpu-v4": TpuTarget("v4:2x2x1", "TPUv4 chip", 275.0, 32.0, (("chip_config_name", "megacore"),)),
    "tpu-v5e": TpuTarget("v5e:2x2", "TPUv5e chip", 197.0, 16.0),
    "tpu-v5p": TpuTarget("v5p:2x2x1", "TPUv5p chip", 459.0, 95.0),
    "tpu-v6e": TpuTarget("v6e:2x2", "TPUv6e chip", 918.0, 32.0),
}
HERE = "here"

# Deviceless compilation reads no TPU and no metadata server: tell libtpu so, before JAX starts
# (without these it waits on GCE's metadata server, or refuses while another process holds its
# lockfile).
_DEVICELESS_TPU_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v3-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def prepare_deviceless_compiles() -> None:
    """Sets libtpu's deviceless variables and keeps JAX off any TPU (call before JAX starts)."""
    for key, value in _DEVICELESS_TPU_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # run nothing on a TPU, even on a TPU host


def check_target(target: str) -> TpuTarget | None:
    """The TPU to compile for (None: the local backend); a clear error before any work otherwise."""
    if target == HERE:
        return None
    if target not in TPU_TARGETS:
        raise ValueError(f"unknown --target {target!r}; choose {HERE!r} or one of {sorted(TPU_TARGETS)}.")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--target {target} compiles with libtpu's TPU compiler, which is not installed: "
                         "pip install -c requirements/lock.txt -e \".[tpu-plan]\" (no TPU needed).")
    return TPU_TARGETS[target]


def target_device(tpu: TpuTarget | None):
    """The device to compile one step for: the first of `tpu`'s deviceless topology, else JAX's default."""
    if tpu is None:
        return None
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    return topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology, **dict(tpu.options)).devices[0]


def all_config_specs() -> list[str]:
    """Every config the plan covers, as `file.py:arg`; `file.py:Fk+` is Fk's recipe with the F+ model."""
    specs = [f"nfnet.py:F{k}" for k in range(8)] + [f"nfnet.py:F{k}+" for k in range(8)]
    specs += [f"nf_resnet.py:{depth}" for depth in ("50", "101", "152", "200", "288", "600")]
    specs += [f"nf_regnet.py:B{k}" for k in range(9)]
    return specs


def spec_order(spec: str) -> tuple[int, str]:
    """Sort key putting configs in the plan's order (F0 … F7, F0+ … F7+, NF-ResNets, NF-RegNets)."""
    specs = all_config_specs()
    return (specs.index(spec) if spec in specs else len(specs)), spec


def target_order(target: str) -> int:
    """Sort key putting TPU targets in generation order (v3, v4, v5e, v5p, v6e), anything else after."""
    targets = list(TPU_TARGETS)
    return targets.index(target) if target in targets else len(targets)


def fits_target(peak_gib: float, target: str) -> bool:
    """Whether a step of this peak fits one device of the TPU `target` with HEADROOM to spare."""
    return peak_gib <= HEADROOM * TPU_TARGETS[target].hbm_gib


def config_label(spec: str, overrides: list[str]) -> str:
    """The name a `--config=FILE[:arg]` plan's rows carry: the file as configs/ names it
    (`nfnet.py:F3`) or its path, then each `a.b=value` override, so that a row never passes for
    the recipe it changed.

    Raises:
      ValueError: an override of `train.remat`, which the plan's own `--remat` sets per row.
    """
    if any(item.startswith("train.remat=") for item in overrides):
        raise ValueError("--config.train.remat: the plan sets remat per row; pass --remat instead.")
    path, separator, arg = spec.partition(":")
    resolved = pathlib.Path(path).resolve()
    name = resolved.name if resolved.parent == CONFIGS else path
    return " ".join([f"{name}{separator}{arg}", *overrides])


def recipe_file(label: str) -> str:
    """The config file's name in a row's label (`nfnet.py` of `nfnet.py:F3 train.seed=1`)."""
    return pathlib.Path(label.split(" ", 1)[0].partition(":")[0]).name


def planned_config(spec: str, config=None, per_device_batch: int | None = None):
    """(a config this plan may change, the per-device batch) of one row: `config` (a `--config`
    with its overrides, `spec` its `config_label`) or `spec`'s from configs/, at `per_device_batch`
    or the recipe's (the global batch over `RECIPE_DEVICES`)."""
    config = load_config(spec) if config is None else config.copy_and_resolve_references().unlock()
    return config, per_device_batch or max(1, config.train.batch_size // RECIPE_DEVICES.get(recipe_file(spec), 1))


def requested_specs(flag_values, config, default: list[str]) -> list[str]:
    """The rows' configs a plan was asked for: the one `--config` (with its overrides) or
    `--only`'s list (default: `default`); every mistake is one error line (`command_line.fail`)."""
    if config is not None:
        if flag_values["only"].present:
            command_line.fail("--config names one config and --only a list of them: pass one of the two.")
        try:
            return [config_label(command_line.config_spec(flag_values), command_line.config_overrides(flag_values))]
        except ValueError as error:
            command_line.fail(error)
    specs = [s.strip() for s in flag_values["only"].value if s.strip()] or default
    missing = [s for s in specs if not (CONFIGS / s.partition(":")[0]).is_file()]
    if missing or not specs:
        command_line.fail(f"--only: no config file for {missing or 'any config'} in {CONFIGS}; e.g. "
                          + ", ".join(all_config_specs()[:3]))
    return specs


def load_config(spec: str):
    """The config of `file.py:arg` from configs/ (a trailing `+` swaps NFNet-Fk for Fk+)."""
    file_name, _, arg = spec.partition(":")
    plus = arg.endswith("+")
    config = config_files.load_config(f"{CONFIGS / file_name}:{arg.rstrip('+')}")
    if plus:
        if file_name != "nfnet.py":
            raise ValueError(f"{spec}: only NFNet configs have '+' (wide) variants.")
        config.model.name += "plus"
    return config


@dataclasses.dataclass
class Row:
    config: str
    model: str
    image_size: int
    per_device_batch: int
    compute_dtype: str
    remat: bool
    argument_gib: float
    output_gib: float
    temp_gib: float
    peak_gib: float
    gflops: float | None
    compile_s: float
    step_s: float | None = None
    compiled_for: str = "local backend"
    # The TPU compiler's refusal when the step cannot fit its device (then the sizes are NaN, but
    # for `temp_gib`: the temporaries it said it would need, when it said so).
    out_of_memory: str | None = None
    # After a refusal: what the refusal proves the peak exceeds (the memory it asked for, and the
    # device's HBM, which it did not fit); NaN if the message gave no size.
    peak_at_least_gib: float = math.nan

    def fits(self) -> dict[str, bool | None]:
        """Per accelerator: the peak within HEADROOM of its memory; after an out-of-memory refusal,
        False where even what the refusal proves is needed is too much, else None (unknown)."""
        if self.out_of_memory is None:
            return {name: self.peak_gib <= HEADROOM * size for name, size in ACCELERATORS.items()}
        return {name: (False if self.peak_at_least_gib > HEADROOM * size else None)  # NaN > x is False
                for name, size in ACCELERATORS.items()}


# libtpu words a refusal in (at least) two ways, with sizes such as "103.92G" or "216.34M":
#   "... the total memory required for HLO temporaries (103.92G) exceeds available HBM (15.48G)."
#   "... CompileTimeHbmOom: ... Ran out of memory in memory space hbm. Used 15.69G of 15.48G hbm. ..."
_SIZE = r"(\d+(?:\.\d+)?)([KMGT])"
_TPU_OOM_TEMPORARIES = re.compile(rf"required for HLO temporaries \({_SIZE}\)")
_TPU_OOM_LOWER_BOUNDS = (_TPU_OOM_TEMPORARIES, re.compile(rf"available HBM \({_SIZE}\)"),
                         re.compile(rf"Used {_SIZE} of"), re.compile(rf"of {_SIZE} hbm"))
_UNITS = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0, "T": 2.0**10}


def _gib(match: re.Match | None) -> float:
    return float(match.group(1)) * _UNITS[match.group(2)] if match else math.nan


def refusal_sizes(message: str) -> tuple[float, float]:
    """(temporaries asked for, what the peak must exceed) in GiB from a TPU compiler's refusal; NaN
    for what the message does not say. A refused step needs more than its device's HBM in any case."""
    bounds = [_gib(pattern.search(message)) for pattern in _TPU_OOM_LOWER_BOUNDS]
    known = [bound for bound in bounds if not math.isnan(bound)]
    return bounds[0], max(known) if known else math.nan


def measure(spec: str, per_device_batch: int | None, remat: bool, time_steps: int, device=None,
            config=None) -> Row:
    """Compiles `spec`'s train step for one device from abstract inputs and reads its memory.

    `device`: where to compile for (default: JAX's first device); a deviceless TPU device
    (`target_device`) compiles with the TPU compiler here, and then nothing can be timed.
    `config`: the config to plan (a `--config` with its overrides; `spec` is then its
    `config_label`); default: `load_config(spec)`.
    """
    import jax  # pylint: disable=import-outside-toplevel

    from nfnets_jax.analysis.compiled_memory import GIB, compiled_memory  # pylint: disable=import-outside-toplevel
    from nfnets_jax.models.flops import xla_flops  # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import one_device_step  # pylint: disable=import-outside-toplevel

    config, batch = planned_config(spec, config, per_device_batch)
    if config.model.name.startswith(("nfnet", "nf_regnet")):
        config.model.kwargs.grouped_conv_impl = "xla"  # the accelerators' op, whatever compiles here
    config.train.remat = remat
    deviceless = device is not None and device.platform != jax.default_backend()
    if deviceless and time_steps > 0:
        raise ValueError("--time_steps needs the device itself; a deviceless TPU target can only be compiled.")
    step = one_device_step.build(config, batch, device=device)
    start = time.perf_counter()
    lowered = step.train.lower(step.abstract_state(), step.batch_shapes)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        # A TPU compiler refuses a program that cannot fit its device's HBM (after rematerialising
        # what it could on its own): that is an answer of the plan, not a failure of it.
        if not (deviceless and "RESOURCE_EXHAUSTED" in str(error)):
            raise
        message = str(error).strip().splitlines()[0]
        nan = math.nan
        temporaries, peak_at_least = refusal_sizes(message)
        return Row(config=spec, model=config.model.name, image_size=config.data.image_size, per_device_batch=batch,
                   compute_dtype=config.precision.compute_dtype, remat=remat, argument_gib=nan, output_gib=nan,
                   temp_gib=temporaries, peak_gib=nan, gflops=None, compile_s=time.perf_counter() - start,
                   compiled_for=device.device_kind, out_of_memory=message, peak_at_least_gib=peak_at_least)
    compile_s = time.perf_counter() - start
    memory = compiled_memory(compiled)
    flops = xla_flops(compiled)
    step_s = None
    if time_steps > 0:
        state, data = jax.jit(step.init_state)(), step.random_batch()
        state, _ = jax.block_until_ready(compiled(state, data))
        start = time.perf_counter()
        for _ in range(time_steps):
            state, _ = compiled(state, data)
        jax.block_until_ready(state)
        step_s = (time.perf_counter() - start) / time_steps
    return Row(config=spec, model=config.model.name, image_size=config.data.image_size, per_device_batch=batch,
               compute_dtype=config.precision.compute_dtype, remat=remat,
               argument_gib=memory.argument_bytes / GIB, output_gib=memory.output_bytes / GIB,
               temp_gib=memory.temp_bytes / GIB, peak_gib=memory.peak_gib,
               gflops=None if flops is None else flops / 1e9, compile_s=compile_s, step_s=step_s,
               compiled_for=(device.device_kind if device is not None else jax.devices()[0].device_kind))


def markdown_header() -> str:
    names = list(ACCELERATORS)
    head = ("| config | model | px | batch/device | remat | state+batch GiB | temporaries GiB | peak GiB | "
            "step TFLOP | " + " | ".join(names) + " |")
    return head + "\n|" + "---|" * (9 + len(names))


def markdown_row(row: Row) -> str:
    fits = row.fits()
    tflop = "?" if row.gflops is None else f"{row.gflops / 1e3:.2f}"
    gib = lambda value: "?" if math.isnan(value) else f"{value:.2f}"
    temp = gib(row.temp_gib) if row.out_of_memory is None else f"≥ {gib(row.temp_gib)} (out of memory)"
    peak = gib(row.peak_gib) if row.out_of_memory is None else f"> {gib(row.peak_at_least_gib)}"
    verdict = {True: "yes", False: "no", None: "?"}
    return (f"| {row.config} | {row.model} | {row.image_size} | {row.per_device_batch} | "
            f"{'on' if row.remat else 'off'} | {gib(row.argument_gib)} | {temp} | {peak} | "
            f"{tflop} | " + " | ".join(verdict[fits[name]] for name in ACCELERATORS) + " |")


def json_row(row: Row, target: str) -> dict:
    """`row` as one JSON record: NaN sizes as null, what fits, and what compiled it (the target,
    versions, commit, date), so a page rendered from records says what each number holds for."""
    from nfnets_jax.runtime import provenance  # pylint: disable=import-outside-toplevel

    fields = {key: None if isinstance(value, float) and math.isnan(value) else value
              for key, value in dataclasses.asdict(row).items()}
    run_provenance = provenance.collect(devices=False)
    return {**fields, "fits": row.fits(), "target": target, "jax": run_provenance["versions"]["jax"],
            "libtpu": run_provenance["versions"]["libtpu"], "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "provenance": run_provenance}


def render_page(records_path: str, page_path: str | None) -> None:
    """Prints the page's generated sections rendered from the records, or writes them into the page."""
    from . import generated_section, memory_plan_page  # pylint: disable=import-outside-toplevel

    try:
        sections = memory_plan_page.sections(generated_section.read_json_lines(records_path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        command_line.fail(f"--table={records_path}: cannot read its records ({error}).")
    if page_path is None:
        print("\n\n".join(f"## {name}\n\n{text}" for name, text in sections.items()))
        return
    try:
        generated_section.write_sections(page_path, sections)
    except (OSError, ValueError) as error:
        command_line.fail(f"--into={page_path}: {error}")


FLAGS = flags.FlagValues()  # this program's own (command_line.parse_flags says why)
flags.DEFINE_list("only", [], "Config specs file.py:arg (e.g. nfnet.py:F0,nf_regnet.py:B0; a trailing + is the "
                  "NFNet's F+ model); default: all of " + ", ".join(all_config_specs()), flag_values=FLAGS)
_CONFIG = command_line.define_config_flag(FLAGS, "to plan instead of --only's list", None)
flags.DEFINE_integer("per_device_batch", None, "Images per device (default: the recipe's).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("remat", "both", ["off", "on", "both"], "Compile without hk.remat, with it, or both.",
                  flag_values=FLAGS)
flags.DEFINE_integer("time_steps", 0, "Also time this many real steps per row (on an accelerator; slow on a CPU).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_bool("json", False, "One JSON line per row instead of a table.", flag_values=FLAGS)
flags.DEFINE_string("table", None, "A file of this program's --json lines (docs/memory_plan.jsonl): print the "
                    "page's tables and verdicts rendered from it and exit.", flag_values=FLAGS)
flags.DEFINE_string("into", None, "With --table: write them into this page's generated sections instead of printing.",
                    flag_values=FLAGS)
flags.DEFINE_enum("target", HERE, [HERE, *TPU_TARGETS], "Compile for JAX's backend here, or for one device of a "
                  "TPU generation without a TPU (needs libtpu; see the module doc).", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    command_line.parse_flags([__name__, *(sys.argv[1:] if argv is None else argv)], lambda: _CONFIG.value,
                             flag_values=FLAGS, multihost=False, positional=False)
    args = FLAGS
    if args.into and not args.table:
        command_line.fail("--into writes the tables of --table=JSONL into a page: pass --table too.")
    if args.table:
        compiling = [name for name in ("only", "config", "per_device_batch", "time_steps", "json", "target")
                     if FLAGS[name].present]
        if compiling or FLAGS["remat"].present:
            command_line.fail(f"--table renders records and compiles nothing: drop --{', --'.join(compiling or ['remat'])}.")
        render_page(args.table, args.into)
        return
    specs = requested_specs(FLAGS, _CONFIG.value, all_config_specs())
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    try:
        tpu = check_target(args.target)
    except ValueError as error:
        command_line.fail(error)
    if tpu is not None:
        if args.time_steps:
            command_line.fail("--time_steps needs the device itself; with a TPU --target the plan only compiles.")
        prepare_deviceless_compiles()

    import jax  # pylint: disable=import-outside-toplevel

    try:
        device = target_device(tpu)
    except Exception as error:  # pylint: disable=broad-except  # libtpu's errors have no common type
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        command_line.fail(f"libtpu could not describe a {tpu.label} ({first_line}); install the libtpu this jax "
                          f"pins: pip install -c requirements/lock.txt -e \".[tpu-plan]\"")
    compiler = f"XLA:{jax.default_backend()}" if tpu is None else f"libtpu for one {tpu.label} (deviceless)"
    print(f"# Train-step memory per device, compiled by {compiler} (jax {jax.__version__}); "
          f"'fits' = peak <= {HEADROOM:.0%} of the device", flush=True)
    if not args.json:
        print(markdown_header(), flush=True)
    for spec in specs:
        for remat in remats:
            row = measure(spec, args.per_device_batch, remat, args.time_steps, device=device, config=_CONFIG.value)
            if args.json:
                print(json.dumps(json_row(row, args.target)), flush=True)
            else:
                extra = f" (compile {row.compile_s:.0f}s" + (f", step {row.step_s:.3f}s)" if row.step_s else ")")
                print(markdown_row(row) + extra, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
