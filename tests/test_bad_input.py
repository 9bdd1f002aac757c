"""Every mistake a user can make on the command line of `experiments.train` / `experiments.eval`
ends in one clear line on stderr, a non-zero exit, no traceback, and nothing written.

The class covered: the config file (missing, not Python, a syntax error, no `get_config`, a
variant it does not take), `--config.*` overrides (a misspelt field, a value of the wrong type,
an invalid value, a model that does not build), the workdir (a file, under a file, holding
another model's run, holding only corrupt checkpoints), the multi-host flags (partial, out of
range, a non-positive heartbeat, both ways at once), weight files (missing, a hostile pickle, a
crafted header declaring terabytes) and stray arguments.

Each command's cases run in ONE fresh interpreter (this file as a script), calling the command's
own flag parser and `main()` in turn, as `app.run` does: one start-up of JAX/TensorFlow per
command instead of one per case. Training itself is never reached: the child replaces the train
step builder with a function that fails loudly, so a case that slips through the door shows up
as "reached training" instead of training for minutes.
"""

import contextlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

TIMEOUT_S = 600
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STDERR_LINES = 8


class _Hostile:
    """Unpickling this runs `os.system` (for a loader that trusts pickles)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


INPUT_NAMES = ("syntax_error.py", "no_get_config.py", "not_python.txt", "a_file", "hostile.npz", "huge.npz",
               "pwned", "new_workdir", "changed_model", "corrupt", "exits.py", "raises.py", "returns_none.py",
               "partial.py", "strings.npz", "nan.npz", "deep.safetensors", "no_fashion_mnist", "empty_data_dir")


def _write_inputs(root):
    """The files the cases point at."""
    paths = {name: str(root / name) for name in INPUT_NAMES}
    (root / "no_fashion_mnist").mkdir()  # Debian's dataset-fashion-mnist not installed here
    (root / "empty_data_dir").mkdir()  # nothing prepared: the source would prepare from the files
    (root / "syntax_error.py").write_text("def get_config(:\n")
    (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (root / "raises.py").write_text("def get_config(arg=None):\n    raise RuntimeError('no such recipe')\n")
    (root / "returns_none.py").write_text("def get_config(arg=None):\n    return None\n")
    (root / "partial.py").write_text("import ml_collections\ndef get_config(arg=None):\n"
                                     "    return ml_collections.ConfigDict({'model': {'name': 'nfnet_f0'}})\n")
    np.savez(paths["strings.npz"], **{"NFNet/~/linear/w": np.array(["a", "b"])})
    np.savez(paths["nan.npz"], **{"NFNet/~/linear/w": np.array([1.0, np.nan], np.float32)})
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    pathlib.Path(paths["deep.safetensors"]).write_bytes(len(deep).to_bytes(8, "little") + deep)
    (root / "no_get_config.py").write_text("import ml_collections\nCONFIG = ml_collections.ConfigDict()\n")
    (root / "not_python.txt").write_text("model: nfnet\n")
    (root / "a_file").write_text("I am a file\n")
    with open(paths["hostile.npz"], "wb") as f:
        pickle.dump({"params": _Hostile(paths["pwned"])}, f, protocol=2)
    header = io.BytesIO()  # an .npy member whose header declares 16 TiB of float32
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 4)})
    with zipfile.ZipFile(paths["huge.npz"], "w") as archive:
        archive.writestr("linear/w.npy", header.getvalue() + b"\0" * 64)
    return paths


def _cases(paths):
    """command -> {case name: argv}. Each must fail at the door."""
    workdir = f"--workdir={paths['new_workdir']}"
    digits = "--config=configs/digits.py"  # overrides follow the config they change
    train = {
        "misspelt_override": [digits, "--config.train.batch_sise=64", workdir],
        "misspelt_override_of_default_config": ["--config.train.batch_sise=64", workdir],
        "misspelt_override_before_config": ["--config.train.batch_sise=64", digits, workdir],
        "override_wrong_type": [digits, "--config.train.batch_size=abc", workdir],
        "override_invalid_value": [digits, "--config.parallel.backend=tpu_magic", workdir],
        "model_does_not_build": [digits, "--config.model.kwargs.depths=(1,1)", workdir],
        "missing_config_file": ["--config=configs/no_such.py", workdir],
        "config_not_python": [f"--config={paths['not_python.txt']}", workdir],
        "config_syntax_error": [f"--config={paths['syntax_error.py']}", workdir],
        "config_without_get_config": [f"--config={paths['no_get_config.py']}", workdir],
        "config_variant_not_taken": ["--config=configs/digits.py:F99", workdir],
        "config_variant_unknown": ["--config=configs/nfnet.py:F99", workdir],
        "workdir_is_a_file": [f"--workdir={paths['a_file']}"],
        "workdir_under_a_file": [f"--workdir={paths['a_file']}/run"],
        "num_processes_alone": ["--num_processes=2", workdir],
        "coordinator_without_process_id": ["--coordinator_address=127.0.0.1:1", "--num_processes=2", workdir],
        "process_id_out_of_range": ["--coordinator_address=127.0.0.1:1", "--num_processes=2",
                                    "--process_id=2", workdir],
        "negative_heartbeat": ["--heartbeat_timeout_seconds=-5", workdir],
        "distributed_and_explicit": ["--distributed", "--coordinator_address=127.0.0.1:1",
                                     "--num_processes=1", "--process_id=0", workdir],
        "init_from_hostile_pickle": [digits, f"--config.checkpoint.init_from={paths['hostile.npz']}", workdir],
        "init_from_huge_header": [digits, f"--config.checkpoint.init_from={paths['huge.npz']}", workdir],
        "init_from_missing": [digits, "--config.checkpoint.init_from=/no/such/weights.npz", workdir],
        "stray_argument": ["train_now", workdir],
        "resume_with_changed_model": [digits, f"--workdir={paths['changed_model']}",
                                      "--config.model.kwargs.widths=(32,64,128,256)"],
        "all_checkpoints_corrupt": [f"--workdir={paths['corrupt']}"],
        "workdir_empty": ["--workdir="],
        "config_calls_sys_exit": [f"--config={paths['exits.py']}", workdir],
        "config_get_config_raises": [f"--config={paths['raises.py']}", workdir],
        "config_returns_none": [f"--config={paths['returns_none.py']}", workdir],
        "config_partial": [f"--config={paths['partial.py']}", workdir],
        "seed_too_large": [digits, "--config.train.seed=1180591620717411303424", workdir],
        "seed_negative": [digits, "--config.train.seed=-1", workdir],
        "init_from_string_dtype": [digits, f"--config.checkpoint.init_from={paths['strings.npz']}", workdir],
        "init_from_nan_weights": [digits, f"--config.checkpoint.init_from={paths['nan.npz']}", workdir],
        "init_from_deep_safetensors": [digits, f"--config.checkpoint.init_from={paths['deep.safetensors']}",
                                       workdir],
        "fashion_mnist_not_installed": [
            "--config=configs/fashion_mnist.py",
            f"--config.data.fashion_mnist_local.manual_dir={paths['no_fashion_mnist']}",
            f"--config.data.data_dir={paths['empty_data_dir']}", workdir],
    }
    evaluate = {
        "misspelt_override": ["--config=configs/digits.py", "--config.eval.batch_sise=64"],
        "override_without_config": ["--config.eval.batch_size=64"],
        "override_without_config_with_variant": ["--variant=F0", "--config.eval.batch_size=64"],
        "missing_config_file": ["--config=configs/no_such.py"],
        "config_syntax_error": [f"--config={paths['syntax_error.py']}"],
        "config_variant_not_taken": ["--config=configs/digits.py:F99"],
        "variant_and_config": ["--variant=F0", "--config=configs/nfnet.py:F0"],
        "unknown_variant": ["--variant=F99", f"--weights={paths['huge.npz']}"],
        "weights_and_workdir": [f"--weights={paths['huge.npz']}", f"--workdir={paths['changed_model']}"],
        "workdir_is_a_file": [f"--workdir={paths['a_file']}"],
        "workdir_missing": [f"--workdir={paths['new_workdir']}"],
        "weights_missing": ["--weights=/no/such/weights.npz"],
        "weights_hostile_pickle": [f"--weights={paths['hostile.npz']}"],
        "weights_huge_header": [f"--weights={paths['huge.npz']}"],
        "model_does_not_build": ["--config=configs/digits.py", "--config.model.kwargs.depths=(1,1)",
                                 f"--weights={paths['huge.npz']}"],
        "num_processes_alone": ["--num_processes=2"],
        "process_id_out_of_range": ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=-1"],
        "negative_heartbeat": ["--heartbeat_timeout_seconds=0"],
        "stray_argument": ["now"],
        "workdir_empty": ["--workdir="],
        "weights_empty": ["--weights="],
        "config_returns_none": [f"--config={paths['returns_none.py']}"],
        "config_partial": [f"--config={paths['partial.py']}"],
        "weights_string_dtype": [f"--weights={paths['strings.npz']}"],
        "weights_nan": [f"--weights={paths['nan.npz']}"],
        "weights_deep_safetensors": [f"--weights={paths['deep.safetensors']}"],
    }
    return {"train": train, "eval": evaluate}


def _snapshot(root):
    """Every path under `root` with its size and mtime: 'nothing written' means this is unchanged."""
    return sorted((os.path.relpath(os.path.join(folder, name), root),
                   os.path.getsize(os.path.join(folder, name)), os.path.getmtime(os.path.join(folder, name)))
                  for folder, dirs, files in os.walk(root) for name in dirs + files)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Runs every case of both commands (two child interpreters); {command: {case: result}}."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = _write_inputs(root)
    _make_digits_checkpoint(paths["changed_model"])
    _make_digits_checkpoint(paths["corrupt"])
    os.remove(os.path.join(paths["corrupt"], "checkpoints", "3", "state", "_METADATA"))
    before = _snapshot(root)
    results = {}
    for command, cases in _cases(paths).items():
        spec = root / f"{command}_cases.json"
        spec.write_text(json.dumps(cases))
        child = subprocess.run([sys.executable, os.path.abspath(__file__), command, str(spec)],
                               capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO_ROOT)
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
        results[command] = json.loads(child.stdout.strip().splitlines()[-1])
    return results, paths, before, _snapshot(root)


ALL_CASES = [(command, name) for command, cases in _cases({k: k for k in INPUT_NAMES}).items() for name in cases]


@pytest.mark.slow
@pytest.mark.parametrize("command,case", ALL_CASES, ids=[f"{c}-{n}" for c, n in ALL_CASES])
def test_bad_input_fails_at_the_door_in_one_line(outcomes, command, case):
    results, paths, _, _ = outcomes
    result = results[command][case]
    stderr = result["stderr"].strip()
    assert result["code"] not in (0, None, "exception", "reached training"), result
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: "), stderr
    assert 1 <= len(stderr.splitlines()) <= MAX_STDERR_LINES, stderr
    assert not os.path.exists(paths["new_workdir"])  # never created by any case
    assert not os.path.exists(paths["pwned"])  # the hostile pickle ran nothing


@pytest.mark.slow
def test_nothing_in_any_existing_folder_was_written(outcomes):
    results, _, before, after = outcomes
    changed = sorted(set(before) ^ set(after))
    # Only the all-corrupt workdir may gain the files of a run that got as far as its restore.
    assert all(path.startswith(("corrupt", "train_cases.json", "eval_cases.json")) for path, *_ in changed), changed


@pytest.mark.slow
def test_messages_name_the_fix(outcomes):
    results, paths, _, _ = outcomes
    train, evaluate = results["train"], results["eval"]
    for case in ("misspelt_override", "misspelt_override_of_default_config", "misspelt_override_before_config"):
        assert 'Did you mean "batch_size"' in train[case]["stderr"], case
    assert "pass --config=FILE" in evaluate["override_without_config"]["stderr"]
    assert "does not build" in train["model_does_not_build"]["stderr"]
    assert "configs/digits.py has no variants" in train["config_variant_not_taken"]["stderr"]
    assert "refusing to load" in train["init_from_hostile_pickle"]["stderr"]
    assert paths["huge.npz"] in train["init_from_huge_header"]["stderr"]
    assert paths["huge.npz"] in evaluate["weights_huge_header"]["stderr"]
    changed = train["resume_with_changed_model"]["stderr"]
    assert "of its arrays differ" in changed and "Nothing was changed" in changed
    assert "--process_id" in train["num_processes_alone"]["stderr"]
    assert "Nothing was loaded" in train["all_checkpoints_corrupt"]["stderr"]
    assert "--workdir= is empty" in train["workdir_empty"]["stderr"] and "--weights= is empty" in evaluate["weights_empty"]["stderr"]
    assert "sys.exit(3)" in train["config_calls_sys_exit"]["stderr"]
    assert "RuntimeError: no such recipe" in train["config_get_config_raises"]["stderr"]
    for command in (train, evaluate):
        assert "returned NoneType" in command["config_returns_none"]["stderr"]
        assert "lacks 10 field(s)" in command["config_partial"]["stderr"]
    assert "config.train.seed" in train["seed_too_large"]["stderr"] and "config.train.seed" in train["seed_negative"]["stderr"]
    for case in ("init_from_string_dtype", "weights_string_dtype"):
        assert "not numbers" in (train.get(case) or evaluate[case])["stderr"], case
    for case in ("init_from_nan_weights", "weights_nan"):
        assert "NaN or infinite" in (train.get(case) or evaluate[case])["stderr"], case
    for case in ("init_from_deep_safetensors", "weights_deep_safetensors"):
        assert "levels deep" in (train.get(case) or evaluate[case])["stderr"], case
    fashion = train["fashion_mnist_not_installed"]["stderr"].strip()
    assert fashion.startswith(f"error: Fashion-MNIST not found at {paths['no_fashion_mnist']}"), fashion
    assert "apt-get install -y dataset-fashion-mnist" in fashion and len(fashion.splitlines()) == 1


def _run_train(args, timeout=TIMEOUT_S, prefix=()):
    """`python -m experiments.train ARGS` in a fresh interpreter, as a user types it."""
    return subprocess.run([*prefix, sys.executable, "-m", "experiments.train", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def _assert_one_line_failure(result, *needles):
    stderr = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in stderr, stderr


@pytest.mark.slow
def test_misspelt_override_of_the_default_config_is_one_line_in_a_real_process(tmp_path):
    """ml_collections applies overrides while a flag's default is set, at import: with a default
    config file there, a misspelt override was a 3-traceback dump before any parser of ours ran."""
    workdir = tmp_path / "run"
    _assert_one_line_failure(_run_train(["--config.train.batch_sise=64", f"--workdir={workdir}"]),
                             'Did you mean "batch_size"')
    assert not workdir.exists()


@pytest.mark.slow
def test_a_bad_host_memory_setting_stops_train_at_the_door_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    _assert_one_line_failure(_run_train([f"--workdir={workdir}"], prefix=("env", "NFNETS_HOST_MALLOC=sometimes")),
                             "NFNETS_HOST_MALLOC", "keep")


def _immutable_folder(path):
    """`path` made immutable with chattr (root cannot write there either); None where unsupported."""
    path.mkdir()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        return None
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["read_only_bits", "immutable", "immutable_parent", "kernel_filesystem"])
def test_unwritable_workdir_fails_at_the_door(tmp_path, kind):
    """A workdir this process cannot write, whatever the reason, is refused in one line before
    anything starts, also for root (which permission bits and os.access do not stop)."""
    prefix = ()
    if kind == "read_only_bits":
        workdir = tmp_path / "ro"
        workdir.mkdir(mode=0o555)
        if os.geteuid() == 0:  # root ignores permission bits: drop the capabilities that let it
            if subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"],
                              capture_output=True, check=False).returncode != 0:
                pytest.skip("setpriv cannot drop root's DAC capabilities here")
            prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    elif kind in ("immutable", "immutable_parent"):
        folder = _immutable_folder(tmp_path / "frozen")
        if folder is None:
            pytest.skip("chattr +i is not supported here")
        workdir = folder if kind == "immutable" else folder / "run"
    else:
        workdir = "/proc/nfnets-no-such-run"
    try:
        result = _run_train([f"--workdir={workdir}", "--config.train.epochs=0.05"], prefix=prefix)
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "frozen")], capture_output=True, check=False)
        os.chmod(tmp_path, 0o755)
    _assert_one_line_failure(result, f"--workdir={workdir}", "pick a folder you can write")
    assert not os.path.exists(os.path.join(workdir, "run")) and not list(pathlib.Path(tmp_path).rglob("*.json"))


def _make_digits_checkpoint(workdir):
    """A workdir as a digits run leaves it: config.json and a checkpoint of the digits model's
    params at step 3 (the train state's other fields are not needed by the checks at the door)."""
    script = f"""
import json, os, sys
sys.argv = ["train"]
import jax, numpy as np, orbax.checkpoint as ocp
from nfnets_jax.models import abstract_init, make_forward
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from configs.digits import get_config
config = get_config()
params, _ = abstract_init(make_forward(config.model.name, 10, config.model.kwargs.to_dict()), 32)
state = {{"step": np.int32(3), "params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)}}
manager = ocp.CheckpointManager(os.path.join({workdir!r}, "checkpoints"), item_names=("state", "meta"))
manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({{"step": 3}})))
manager.wait_until_finished(); manager.close()
open(os.path.join({workdir!r}, "config.json"), "w").write(config.to_json_best_effort(indent=2))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=TIMEOUT_S, capture_output=True,
                   cwd=REPO_ROOT)


def _run_cases(command: str, cases: dict) -> dict:
    """The child: each case through the command's own flag parser and main(), in this process."""
    import importlib  # pylint: disable=import-outside-toplevel
    import traceback  # pylint: disable=import-outside-toplevel

    from absl import flags  # pylint: disable=import-outside-toplevel

    from nfnets_jax.train import loop  # pylint: disable=import-outside-toplevel

    module = importlib.import_module(f"experiments.{command}")

    def reached_training(*args, **kwargs):
        raise _ReachedTraining()

    loop.make_train_step = reached_training
    results = {}
    for name, argv in cases.items():
        for flag_name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, flag_name)  # config_flags registers overrides per parse
        flags.FLAGS.unparse_flags()
        sys.argv = [command] + argv  # config_flags reads its overrides from sys.argv, as app.run
        sys.modules.pop("config_config", None)  # ml_collections' name for a loaded config file
        stderr, code = io.StringIO(), 0
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                remaining = module.parse_flags(sys.argv)
                module.main(remaining)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except _ReachedTraining:
                code = "reached training"
            except BaseException:  # pylint: disable=broad-except
                traceback.print_exc()
                code = "exception"
        results[name] = {"code": code, "stderr": stderr.getvalue()}
    return results


class _ReachedTraining(Exception):
    pass


if __name__ == "__main__":
    outcome = _run_cases(sys.argv[1], json.loads(open(sys.argv[2]).read()))
    print(json.dumps(outcome))


@pytest.mark.slow
def test_a_platform_this_host_lacks_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    _assert_one_line_failure(_run_train([f"--workdir={workdir}"], prefix=("env", "JAX_PLATFORMS=tpu")),
                             "JAX_PLATFORMS='tpu'", "unset JAX_PLATFORMS")
    assert not workdir.exists()


@pytest.mark.slow
def test_a_workdir_whose_lock_cannot_be_taken_is_one_line(tmp_path):
    """`run.lock` that is a folder (or any lock the filesystem refuses): refused in one line."""
    workdir = tmp_path / "run"
    (workdir / "run.lock").mkdir(parents=True)
    _assert_one_line_failure(_run_train([f"--workdir={workdir}", "--config.train.steps=1",
                                         "--config.optimizer.warmup_epochs=0"]),
                             "run.lock is a folder", "Nothing was written")
    assert sorted(os.listdir(workdir)) == ["run.lock"]


def test_a_lock_the_object_store_refuses_is_one_error_naming_the_workdir(monkeypatch):
    """A gs:// bucket that does not exist, or a store that refuses the conditional write: the
    lock's failure is a WorkdirLockError naming the lock and the fix, not the store's traceback."""
    from nfnets_jax.runtime import workdir_lock  # pylint: disable=import-outside-toplevel

    def refuse(*args, **kwargs):
        raise ValueError('NOT_FOUND: Error opening "gs" kvstore: bucket "no-such-bucket" does not exist '
                         '[tensorstore_spec=\'{"driver": "gcs"}\']')

    monkeypatch.setattr(workdir_lock, "_acquire", refuse)  # what TensorStore raises; no network here
    with pytest.raises(workdir_lock.WorkdirLockError) as error:
        workdir_lock.acquire("gs://no-such-bucket/run")
    message = str(error.value)
    assert "gs://no-such-bucket/run/run.lock" in message and 'bucket "no-such-bucket" does not exist' in message
    assert "tensorstore_spec" not in message and len(message.splitlines()) == 1
