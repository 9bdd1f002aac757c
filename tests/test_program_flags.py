"""The command lines of the benchmarks, the memory plan, the reproductions and the timm golden tool
(all read by `experiments.command_line.parse_flags`): a mistake is one `error: ...` line on stderr
and exit status 1, before any model is built or compiled."""

import importlib
import importlib.util
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = ("experiments.memory_plan", "experiments.reproduce", "benchmarks.compare_timm",
            "benchmarks.profile_train_step", "benchmarks.train_step_throughput", "benchmarks.train_step_latency",
            "benchmarks.grouped_conv_grads", "benchmarks.tpu_step_estimate", "tools/make_timm_golden.py")
CONFIG_DRIVEN = ("benchmarks.compare_timm", "benchmarks.profile_train_step", "benchmarks.train_step_throughput",
                 "experiments.memory_plan", "benchmarks.tpu_step_estimate")


def _program(name: str):
    if name.endswith(".py"):  # tools/ is no package: loaded from its file, as `python tools/x.py` runs it
        spec = importlib.util.spec_from_file_location(pathlib.Path(name).stem, REPO_ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


def _error_line(capsys, name: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        _program(name).main(argv)
    stderr = capsys.readouterr().err.strip()
    assert exit_.value.code == 1, (exit_.value.code, stderr)
    assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    return stderr


@pytest.mark.parametrize("name", PROGRAMS)
def test_an_unknown_flag_and_a_stray_word_are_one_line(capsys, name):
    assert "Unknown command line flag 'bogus'" in _error_line(capsys, name, ["--bogus=1"])
    assert "unexpected argument 'stray'" in _error_line(capsys, name, ["stray"])


@pytest.mark.parametrize("name", CONFIG_DRIVEN)
def test_config_driven_programs_take_config_overrides_and_name_a_misspelt_field(capsys, name):
    message = _error_line(capsys, name, ["--config=configs/digits.py", "--config.train.batch_sise=3"])
    assert 'Did you mean "batch_size"' in message
    assert "no such config file" in _error_line(capsys, name, ["--config=configs/nope.py"])


@pytest.mark.parametrize("name, argv, needle", [
    ("experiments.memory_plan", ["--only=nope.py:F0"], "no config file for ['nope.py:F0']"),
    ("experiments.memory_plan", ["--remat=maybe"], "flag --remat=maybe: value should be one of"),
    ("experiments.memory_plan", ["--per_device_batch=0"], "flag --per_device_batch=0: 0 is not a positive integer"),
    ("experiments.memory_plan", ["--config=configs/digits.py", "--only=nfnet.py:F0"], "pass one of the two"),
    ("benchmarks.tpu_step_estimate", ["--config=configs/digits.py", "--only=nfnet.py:F0"], "pass one of the two"),
    ("experiments.memory_plan", ["--config.train.batch_size=3"], "pass --config=FILE too"),
    ("experiments.memory_plan", ["--config=configs/digits.py", "--config.train.remat=True"], "pass --remat instead"),
    ("benchmarks.tpu_step_estimate", ["--config=configs/digits.py", "--noconfig.train.remat"], "pass --remat instead"),
    ("experiments.reproduce", ["--out="], "--out= is empty"),
    ("benchmarks.train_step_latency", ["--model=nfnet_f9"], "--model=nfnet_f9 is not a model"),
    ("benchmarks.train_step_latency", ["--model=nf_resnet50", "--grouped_conv_impl=xla"],
     "nf_resnet50 has no grouped convolutions"),
    ("benchmarks.grouped_conv_grads", ["--shape=8,12,768,5,1"], "5 groups do not divide 768"),
    ("benchmarks.grouped_conv_grads", ["--shape=8,12"], "want 5 to 7 positive integers"),
    ("benchmarks.tpu_step_estimate", ["--into=some_page"], "pass --table too"),
    ("benchmarks.train_step_throughput", ["--steps=0"], "flag --steps=0: 0 is not a positive integer"),
    ("benchmarks.compare_timm", ["--timm_python="], "--timm_python=/path/to/venv/bin/python"),
    ("tools/make_timm_golden.py", ["--seed=-1"], "flag --seed=-1"),
])
def test_a_bad_value_says_what_to_change(capsys, monkeypatch, name, argv, needle):
    monkeypatch.delenv("NFNETS_TIMM_PYTHON", raising=False)
    assert needle in _error_line(capsys, name, argv)
