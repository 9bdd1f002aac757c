"""The README's main command, shortened: `python -m experiments.train` with no config or workdir
flags trains the digits demo in ./workdirs/digits, says so, and ends with the accuracy and where
the checkpoint and the plots went; `python -m experiments.eval` then re-evaluates that workdir.

The full 5-minute run is not repeated here: three steps check the plumbing. User errors are
refused before any training with a message naming the fix.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from nfnets_jax import weights

pytestmark = pytest.mark.slow  # subprocess end-to-end runs (pytest.ini)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--config.train.steps=3", "--config.optimizer.warmup_epochs=0", "--config.log.every_steps=1"]


def _run(module, args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, _run("experiments.train", SHORT, cwd)


def test_smoke_demo_trains_in_the_default_workdir_and_reports_where_outputs_went(demo):
    cwd, result = demo
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "configs/digits.py (default)" in out and "workdirs/digits (default)" in out
    assert "step 3/3" in out
    match = re.search(r"Done: 3 steps\. Test top-1 \(EMA params\): ([\d.]+)%", out)
    assert match and 0 <= float(match.group(1)) <= 100
    workdir = cwd / "workdirs" / "digits"
    assert (workdir / "checkpoints" / "3").is_dir()
    assert (workdir / "metrics.jsonl").is_file() and (workdir / "training_curves.png").is_file()
    assert (workdir / "config.json").is_file()
    provenance = json.loads((workdir / "provenance.json").read_text())  # versions behind the result
    assert provenance["versions"]["jax"] and provenance["devices"]["backend"] == "cpu"
    # The AGC clip fraction is logged globally and for every stage of the real model.
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    for label in ("", "/stem", "/stage_1", "/stage_2", "/stage_3", "/stage_4", "/head"):
        assert np.isfinite(train[-1][f"agc/clip_fraction{label}"]), label
    assert f"Checkpoints: {os.path.abspath(workdir / 'checkpoints')}" in out
    assert "Training curves:" in out


def test_smoke_eval_of_the_demo_workdir_repeats_the_final_accuracy(demo):
    cwd, trained = demo
    result = _run("experiments.eval", [], cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    final = re.search(r"\(raw ([\d.]+)%\)", trained.stdout).group(1)
    assert re.search(rf"^  params +top-1 {re.escape(final)}%", result.stdout, re.M), result.stdout
    assert "EMA params" in result.stdout
    assert (cwd / "workdirs" / "digits" / "eval_results.json").is_file()


def test_eval_refuses_weights_that_do_not_fit_the_model_listing_every_mismatch(tmp_path):
    bad = {"NFNet/~/linear": {"w": np.zeros((3, 10), np.float32), "b": np.zeros(10, np.float32)},
           "NFNet/~/not_a_layer": {"w": np.zeros(2, np.float32)}}
    path = tmp_path / "bad.npz"
    weights.save_npz(str(path), bad)
    result = _run("experiments.eval", [f"--weights={path}"], tmp_path)
    assert result.returncode != 0
    assert "NFNet/~/not_a_layer/w" in result.stderr and "missing" in result.stderr
    assert "wrong shape: NFNet/~/linear/w" in result.stderr


# Every line a run, a resume and an evaluation print is the program's own; a line of any other
# shape is a library speaking unasked (TensorFlow's C++ start-up notices, absl's preamble, JAX's or
# orbax's INFO and WARNING lines, AutoGraph's advice, tracebacks ignored in coroutines).
OWN_LINE = re.compile("|".join([
    r"Config: .* device\(s\)$", r"AGC \(clipping=", r"weight decay [\d.e-]+ \(", r"parameter +shape +agc +wd$",
    r"NFNet/~/\S+ +\(", r"First step \(compilation included\): [\d.]+s$", r"step \d+/\d+  loss ",
    r"eval @ step \d+: ", r"Done: \d+ steps\. ", r"Checkpoints: ", r"Metrics: ", r"Training curves: ",
    r"Resumed from .* at step \d+\.$",
    r"nfnet_\w+ from .* on digits:test at \d+px \(", r"  (EMA )?params +top-1 [\d.]+%",
]))


def test_a_run_a_resume_and_an_eval_print_only_their_own_lines(tmp_path):
    workdir = str(tmp_path / "run")
    outputs = {
        "run": _run("experiments.train", [*SHORT, f"--workdir={workdir}"], tmp_path),
        "resume": _run("experiments.train", [*SHORT[1:], "--config.train.steps=4", f"--workdir={workdir}"],
                       tmp_path),
        "eval": _run("experiments.eval", [f"--workdir={workdir}"], tmp_path),
    }
    for name, result in outputs.items():
        assert result.returncode == 0, (name, result.stdout + result.stderr)
        foreign = [line for line in (result.stdout + result.stderr).splitlines()
                   if line.strip() and not OWN_LINE.match(line)]
        assert not foreign, (name, foreign)
    assert "Resumed from" in outputs["resume"].stdout


def test_smoke_eval_of_a_read_only_workdir_reports_and_exits_0_with_one_warning(demo):
    """The results are printed; only their JSON copy cannot be written: one warning, exit 0."""
    cwd, _ = demo
    workdir = cwd / "workdirs" / "digits"
    prefix = []
    if os.geteuid() == 0:  # root ignores permission bits: drop the capabilities that let it
        if subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip("setpriv cannot drop root's DAC capabilities here")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    os.chmod(workdir, 0o555)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run([*prefix, sys.executable, "-m", "experiments.eval"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        os.chmod(workdir, 0o755)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "EMA params" in result.stdout
    assert result.stderr.strip().startswith("warning: the results above could not be saved"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
