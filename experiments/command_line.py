"""What `experiments.train` and `experiments.eval` share at the door: the multi-host flags, and
flag parsing that turns every mistake a user can type into one line on stderr and exit code 1.

The multi-host flags are defined here once; both commands import this module. Everything here
runs before a workdir is created, a device is touched or a dataset is opened, so that a typo costs
a second and leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import flags

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0's coordinator.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", None,
    "Multi-host: seconds without a heartbeat after which a peer counts as dead and the job stops "
    "(default 30: within the ~30 s preemption notice of spot/preemptible VMs).")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host with the cluster found by JAX itself (TPU pods, SLURM).")


class UserError(Exception):
    """A mistake in the command line, a config file or the workdir: shown as one line, exit 1."""


def fail(message: object) -> None:
    """Exits with `error: <message>` on stderr and status 1 (a message that lists every
    mismatch, e.g. of loaded weights, is shown whole: the list is the point)."""
    lines = str(message).strip().splitlines() or ["unknown error"]
    sys.stderr.write("error: " + "\n  ".join(lines) + "\n")
    sys.stderr.flush()
    raise SystemExit(1)


def _innermost_message(error: BaseException) -> str:
    """The most specific text of a chain of exceptions (ml_collections wraps its own errors).

    ml_collections re-raises a misspelt override as KeyError -> KeyError -> AttributeError, each
    quoting the last; the deepest one that suggests a fix ("Did you mean") is the one to show.
    """
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for candidate in chain:
        text = str(candidate.args[0]) if candidate.args else str(candidate)
        if "did you mean" in text.lower():
            return text.strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    # A config file that fails to load: the root cause (SyntaxError, missing get_config, ...).
    root = chain[-1]
    return f"{type(root).__name__}: {root}".replace("\n", " ")


def _config_flag_spec(argv: Sequence[str]) -> str | None:
    """The value of `--config=X` or `--config X` in `argv`, if given."""
    found = _split_config_flag(argv)[0]
    return found[-1].split("=", 1)[1] if found else None


def _split_config_flag(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--config` as one `--config=X` item, or [] if absent; every other item, in order)."""
    config, rest = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--config="):
            config = [arg]
        elif arg == "--config" and index + 1 < len(argv):
            config = [f"--config={argv[index + 1]}"]
            index += 1
        else:
            rest.append(arg)
        index += 1
    return config, rest


def _config_first(argv: Sequence[str], default_config: str | None) -> list[str]:
    """`argv` with `--config` moved before its overrides, or the default config put there.

    ml_collections applies `--config.a.b=v` overrides only after `--config` and reads them from
    sys.argv even while a flag's *default* is being set; so a command with a default config file
    defines the flag without one and gets it here, where a misspelt override is one line too.
    """
    config, rest = _split_config_flag(argv[1:])
    overrides = [arg for arg in rest if arg.startswith("--config.")]
    if not config and default_config is not None:
        config = [f"--config={default_config}"]
    if overrides and not config:
        raise UserError(f"{overrides[0]} overrides a field of a config file: pass --config=FILE "
                        "too (e.g. --config=configs/digits.py, or --config=configs/nfnet.py:F0 "
                        "in place of --variant=F0).")
    return list(argv[:1]) + config + rest


def _check_config_file(spec: str) -> None:
    """A missing or non-Python `--config` file, named before ml_collections tries to import it."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise UserError(f"--config={spec}: no such config file {path!r} (the configs are in configs/, "
                        "e.g. --config=configs/digits.py).")
    if not path.endswith(".py"):
        raise UserError(f"--config={spec}: a config is a Python file with get_config(arg=None).")


def parse_flags(argv: Sequence[str], load_config: Callable[[], object] | None = None, *,
                default_config: str | None = None, flag_values: flags.FlagValues = flags.FLAGS,
                multihost: bool = True, positional: bool = True) -> list[str]:
    """absl's flag parsing, plus loading the config, with every error as one line (exit 1): the
    one way every program of this project reads its command line.

    Used as `app.run(main, flags_parser=...)` by `experiments.train` and `experiments.eval`, and as
    `parse_flags([program, *argv], ..., flag_values=FLAGS, multihost=False)` by programs whose
    `main(argv)` is also called from Python (each of those defines its flags on its own
    `flags.FlagValues`, so that any of them can run in one process). `load_config` touches the
    config flag's value (None: the program has no config), so a config file with a syntax error,
    without `get_config`, refusing its `:arg`, or an override of a field that does not exist
    (`--config.train.batch_sise=64`, with ml_collections' own "did you mean") all fail here,
    before `main` runs. `default_config` is the file used when no `--config` is given (the config
    flag itself must then be defined with no default). `positional=False`: a program that takes
    flags only; a stray word (`--only nfnet.py:F0 F1`, a flag's value after a space where the
    flag takes none) is an error rather than ignored.
    """
    from nfnets_jax.runtime import program_output  # pylint: disable=import-outside-toplevel  (no jax)

    program_output.for_program()  # before a config file or absl can speak
    _forget_earlier_parse(flag_values)
    spec = _config_flag_spec(argv[1:]) if load_config is not None else None
    user_touched_config = any(arg.startswith("--config") for arg in argv[1:])
    try:
        if load_config is not None:
            argv = _config_first(argv, default_config)
            sys.argv[:] = argv  # ml_collections reads the overrides from sys.argv
            if spec is not None:
                _check_config_file(spec)
        remaining = flag_values(list(argv))
        if load_config is not None:
            _check_loaded(load_config(), spec)
        if multihost:
            check_multihost_flags()
        check_path_flags_not_empty(flag_values)
        if not positional and len(remaining) > 1:
            raise UserError(f"unexpected argument {remaining[1]!r}: this program takes --flags only.")
    except UserError as error:
        fail(error)
    except flags.Error as error:
        cause = error.__cause__ or error.__context__
        if cause is None or not str(error).startswith("flag --config"):
            fail(f"{error}")  # absl's own line names the flag and what is wrong with its value
        # A config file's get_config raised (e.g. a variant it does not take): its own message.
        fail(f"bad config ({spec or 'the default'}): {_innermost_message(cause)}")
    except SystemExit as error:  # a config file that calls sys.exit() while it is loaded
        if not user_touched_config:
            raise
        fail(f"bad config ({spec or 'an override'}): loading it called sys.exit({error.code!r}); a config "
             "file defines get_config() and returns the config.")
    except Exception as error:  # pylint: disable=broad-except  # a config file is the user's code
        if not user_touched_config:
            raise  # not the user's config: a bug, keep the traceback
        fail(f"bad config ({spec or 'an override'}): {_innermost_message(error)}")
    return remaining


def define_config_flag(flag_values: flags.FlagValues, purpose: str, default: str | None) -> flags.FlagHolder:
    """The `--config=FILE[:arg]` flag of a program driven by one config, with `--config.a.b=value`
    overrides as `experiments.train` takes them (locked: a misspelt field is an error). It has no
    default of its own (see `_config_first`): pass `default_config=project_config(default)` to
    `parse_flags`; `default` is only named in the help (None: the program runs without a config
    unless one is given, as the plans over a list of configs do)."""
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    said_default = f" (default: configs/{default})" if default else ""
    return config_flags.DEFINE_config_file("config", None, f"Config file[:arg] {purpose}{said_default}.",
                                           lock_config=True, flag_values=flag_values)


def config_overrides(flag_values: flags.FlagValues) -> list[str]:
    """Each `--config.a.b=value` override given, as `a.b=value` with the value as parsed (however
    it was written: `--config.a.b value`, `--noconfig.a.b`), sorted by field."""
    return sorted(f"{name[len('config.'):]}={flag_values[name].value}" for name in flag_values
                  if name.startswith("config.") and flag_values[name].present)


def config_arguments(flag_values: flags.FlagValues) -> list[str]:
    """`--config=FILE[:arg]` and its overrides as given (none without a config), for a program to
    pass on to a child process of its own."""
    if flag_values["config"].value is None:
        return []
    return [f"--config={config_spec(flag_values)}", *(f"--config.{item}" for item in config_overrides(flag_values))]


def project_config(spec: str) -> str:
    """`spec` (`nfnet.py:F0`) as the path of one of the project's config files, from any folder."""
    from nfnets_jax.train import config_files  # pylint: disable=import-outside-toplevel  (no jax)

    return str(config_files.configs_folder() / spec)


def config_spec(flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """The `--config` value a program ran with (file[:arg]), for its outputs to name."""
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    return str(config_flags.get_config_filename(flag_values["config"]))


def _forget_earlier_parse(flag_values: flags.FlagValues) -> None:
    """A program's `main(argv)` may be called again in one process (tests, notebooks): drop the
    earlier parse, and the `--config.*` override flags ml_collections registered for it."""
    if not flag_values.is_parsed():
        return
    for name in [name for name in flag_values if name.startswith("config.")]:
        delattr(flag_values, name)
    flag_values.unparse_flags()


def _check_loaded(config: object, spec: str | None) -> None:
    """What `get_config` returned is a config (a ConfigDict with every field of the schema)."""
    import ml_collections  # pylint: disable=import-outside-toplevel

    if config is None and spec is None:
        return  # a program whose config depends on other flags (experiments.eval's --variant)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"bad config ({spec or 'the default'}): get_config() returned "
                        f"{type(config).__name__}, not an ml_collections.ConfigDict; start from "
                        "config_schema.base_config() (see configs/digits.py).")
    from nfnets_jax.train import config_schema  # pylint: disable=import-outside-toplevel  (no jax)

    missing = config_schema.missing_fields(config)
    if missing:
        raise UserError(f"bad config ({spec or 'the default'}): it lacks {len(missing)} field(s) of the "
                        f"schema ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); start "
                        "from config_schema.base_config() and change what your recipe changes.")


def check_path_flags_not_empty(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--workdir=` (or another path flag) given but empty, e.g. an unset shell variable: a
    mistake, never a request for the default folder."""
    for name in ("workdir", "weights", "out", "root"):
        if name in flag_values and flag_values[name].present and not flag_values[name].value:
            raise UserError(f"--{name}= is empty (an unset shell variable?): pass a path, or leave the "
                            f"flag out{' for the default' if name == 'workdir' else ''}.")


def check_multihost_flags() -> None:
    """The multi-host flags are all given or all absent, in range; the heartbeat is positive."""
    explicit = {"--coordinator_address": COORDINATOR.value, "--num_processes": NUM_PROCESSES.value,
                "--process_id": PROCESS_ID.value}
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < 3:
        missing = [name for name in explicit if name not in given]
        raise UserError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run "
                        "needs all three (or none, with --distributed, to let JAX find a TPU pod or "
                        "SLURM job).")
    if given:
        if NUM_PROCESSES.value < 1:
            raise UserError(f"--num_processes={NUM_PROCESSES.value} must be >= 1.")
        if not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
            raise UserError(f"--process_id={PROCESS_ID.value} must be in [0, --num_processes="
                            f"{NUM_PROCESSES.value}).")
        if DISTRIBUTED.value:
            raise UserError("--distributed lets JAX find the cluster: pass it or --coordinator_address/"
                            "--num_processes/--process_id, not both.")
    if HEARTBEAT_TIMEOUT.value is not None and HEARTBEAT_TIMEOUT.value <= 0:
        raise UserError(f"--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT.value} must be a positive "
                        "number of seconds.")


def restart_hint(what_happens: str = "") -> str:
    """"Restart all [N] processes with the same command[: what_happens]." for dead-peer lines."""
    count = f"{NUM_PROCESSES.value} " if NUM_PROCESSES.value else ""
    return f"Restart all {count}processes with the same command{': ' + what_happens if what_happens else ''}."


def initialize_processes(restart_hint: str) -> None:  # pylint: disable=redefined-outer-name
    """Connects this process to the others as the multi-host flags say (no-op without them).

    In a multi-process run the process first re-runs itself under a watcher
    (nfnets_jax/runtime/supervisor.py), which turns JAX's C++ abort on a dead peer into one line
    ending with `restart_hint`; the watcher never returns from here.
    """
    from nfnets_jax.runtime import supervisor  # pylint: disable=import-outside-toplevel

    multi_process = ((NUM_PROCESSES.value or 1) > 1 or DISTRIBUTED.value
                     or supervisor.launcher_describes_multi_process())
    if supervisor.wanted(multi_process):
        supervisor.supervise(supervisor.own_command(), process_id=PROCESS_ID.value,
                             num_processes=NUM_PROCESSES.value, restart_hint=restart_hint)
    if supervisor.is_child():
        supervisor.die_with_watcher()
    from nfnets_jax.runtime import host_memory  # pylint: disable=import-outside-toplevel
    from nfnets_jax.runtime import distributed  # pylint: disable=import-outside-toplevel

    try:  # before JAX starts its threads (nfnets_jax/runtime/host_memory.py)
        host_memory.keep_freed_memory()
    except ValueError as error:
        fail(error)

    distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                           auto_detect=DISTRIBUTED.value,
                           heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT.value)
    _check_devices()


def _check_devices() -> None:
    """JAX starts its backend (a `JAX_PLATFORMS` naming hardware this host lacks, or a jax build
    without it, fails here) and the failure is one line."""
    import jax  # pylint: disable=import-outside-toplevel

    try:
        jax.devices()
    except RuntimeError as error:
        platforms = os.environ.get("JAX_PLATFORMS")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"JAX cannot start a backend{f' for JAX_PLATFORMS={platforms!r}' if platforms else ''} "
             f"({reason}); unset JAX_PLATFORMS to use what this host has, or install the jax build "
             "for that hardware (README, Install).")


def check_workdir_writable(workdir: str, *, flag: str = "--workdir") -> None:
    """Fails unless `workdir` is a folder we can write, or could create; leaves nothing behind.

    Object-store URLs (`gs://...`) are checked by their first write instead.
    """
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={workdir} is a file, not a folder: pass a folder (it is created if "
                        "missing).")
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise UserError(f"{flag}={workdir}: {existing} is a file, so the folder cannot be created.")
    _probe_write(existing, workdir, flag)


def _probe_write(folder: str, workdir: str, flag: str) -> None:
    """Creates and removes one empty file in `folder`: the one check that sees every reason a
    write fails (permissions, a read-only filesystem, immutable folders, root-squashed NFS, FUSE
    mounts, ACLs, kernel filesystems such as /sys), also for root, which permission bits do not
    stop. The folder's times are put back, so a command that fails later has changed nothing."""
    before = os.stat(folder)
    try:
        handle, probe = tempfile.mkstemp(prefix=".nfnets-write-probe-", dir=folder)
    except OSError as error:
        raise UserError(f"{flag}={workdir}: cannot write in {folder} ({error.strerror}); pick a "
                        "folder you can write.") from error
    os.close(handle)
    os.remove(probe)
    try:
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:
        pass
