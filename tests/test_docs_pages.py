"""The pages under docs/ stay true: what they show as code runs, and their generated tables are
what the code computes today."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_block(page: str, heading: str) -> str:
    """The first ```python block of the section of `page` that starts at `heading`."""
    text = (ROOT / page).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow  # over ~5 s on 2 cores: not in the `-m "not slow"` inner loop
def test_model_zoo_table_rows_are_what_the_code_computes():
    """docs/models.md's zoo table is pasted output of `experiments.model_table`: it must stay true."""
    from experiments import model_table  # pylint: disable=import-outside-toplevel

    page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    for name in ("nfnet_f0", "nfnet_f3plus", "nf_resnet50", "nf_regnet_b0"):
        assert model_table.model_row(name) in page.splitlines(), f"docs/models.md row for {name} is stale"


@pytest.mark.slow
def test_the_optimizer_snippet_runs_as_written(capsys):
    code = _python_block("docs/optimizers.md", "# Swapping optimizers in a notebook")
    namespace: dict = {}
    exec(compile(code, "docs/optimizers.md", "exec"), namespace)  # pylint: disable=exec-used
    # It did what its comments say: SAM around the NFNet chain, three steps, telemetry read back.
    from nfnets_jax import optim  # pylint: disable=import-outside-toplevel

    assert isinstance(namespace["opt_state"], optim.SAMState)
    hyperparams = optim.current_hyperparams(namespace["opt_state"])
    # Warmup of 5 epochs of 100 steps from 0 to 0.1 * 256/256: the third update used 0.1 * 2/500.
    assert float(hyperparams["learning_rate"]) == pytest.approx(0.1 * 2 / 500, rel=1e-6)
    assert 0.0 <= float(optim.clip_fraction_metrics(namespace["opt_state"])["agc/clip_fraction"]) <= 1.0
    assert "agc/clip_fraction" in capsys.readouterr().out


def test_the_readme_python_example_names_what_exists():
    """README's "From Python" lines call the library's public names as they are."""
    from nfnets_jax import models, train  # pylint: disable=import-outside-toplevel
    from nfnets_jax.train import config_files  # pylint: disable=import-outside-toplevel

    assert callable(models.make_forward) and callable(train.build_experiment) and callable(train.run)
    config = config_files.load_config("digits")
    assert config.model.name and config_files.load_config("nfnet:F0").data.image_size == 192


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")
                                        if "<!-- generated: runs start -->" in p.read_text()))
def test_every_rendered_run_section_is_what_its_json_records_say(page):
    from experiments import generated_section, run_record  # pylint: disable=import-outside-toplevel
    text = generated_section.section((ROOT / "docs" / page).read_text(), run_record.SECTION)
    names = run_record.rendered_from(text)
    assert text == run_record.render_section(str(ROOT / "docs"), names), (
        f"docs/{page} differs from its records: python -m experiments.run_record --page=docs/{page} "
        f"--records={','.join('docs/' + n for n in names)}")


def test_the_readme_quotes_the_tpu_step_estimate_of_its_json_line():
    import json  # pylint: disable=import-outside-toplevel
    rows = [json.loads(line) for line in (ROOT / "docs" / "tpu_step_cost.jsonl").read_text().splitlines()
            if line.startswith("{")]
    from benchmarks import tpu_step_estimate  # pylint: disable=import-outside-toplevel
    f0_v3 = lambda of: [r for r in of if r["config"] == "nfnet.py:F0" and r["target"] == "tpu-v3"][-1]
    ours, deepmind = f0_v3(tpu_step_estimate.latest_rows(rows)), f0_v3(tpu_step_estimate.latest_deepmind_rows(rows))
    row = [line for line in (ROOT / "README.md").read_text().splitlines() if "TPUv3 core (32 images" in line][0]
    assert f"**{ours['programs']['step']['estimate_ms']:.2f} ms**" in row
    assert f"DeepMind's step compiled the same way: {deepmind['programs']['step']['estimate_ms']:.1f} ms" in row
    ratio = ours["programs"]["step"]["estimate_ms"] / deepmind["programs"]["step"]["estimate_ms"]
    assert f"ours is {ratio:.3f}× theirs" in row
    assert f"adds {100 * (ours['runner_over_bare']['ratio'] - 1):.1f}% over a bare step" in row
    # Every config and target where both steps compiled without remat, from the same rows.
    key = lambda r: (r["config"], r["target"], r["per_device_batch"])
    ours_of = {key(r): r for r in tpu_step_estimate.latest_rows(rows) if not r["remat"]}
    ratios = [tpu_step_estimate.ours_over_deepmind(ours_of.get(key(theirs)), theirs, "step")
              for theirs in tpu_step_estimate.latest_deepmind_rows(rows)]
    ratios = [r for r in ratios if r is not None]
    assert (f"ours is {min(ratios):.3f}–{max(ratios):.3f}× DeepMind's ({len(ratios)} configs × targets)"
            in row)
    fwd_bwd = [tpu_step_estimate.ours_over_deepmind(ours_of.get(key(theirs)), theirs, "fwd_bwd")
               for theirs in tpu_step_estimate.latest_deepmind_rows(rows)]
    fwd_bwd = [r for r in fwd_bwd if r is not None]
    assert (f"the forward + backward alone: {min(fwd_bwd):.3f}–{max(fwd_bwd):.3f}× "
            f"({len(fwd_bwd)} configs × targets)" in row)
    # The largest runner / bare over every row, and the compile-time goal's verdict.
    latest = [r for r in tpu_step_estimate.latest_rows(rows) if r["estimate_valid"]]
    worst = max(latest, key=lambda r: r["runner_over_bare"]["ratio"])
    short = lambda r: f"{r['config'].split(':')[-1]} on {r['target'].split('-')[-1]}"
    assert f"(at most {100 * (worst['runner_over_bare']['ratio'] - 1):.1f}%, {short(worst)})" in row
    timed, _ = tpu_step_estimate.compared_compile_times(latest)
    compile_ratios = [step / bare for _, step, bare, _, _ in timed]
    above = [short(r) for r, step, bare, _, _ in timed if round(step / bare, 2) > 1.1]
    assert (f"its compile time is {min(compile_ratios):.2f}–{max(compile_ratios):.2f}× the bare step's "
            f"({len(timed)} rows; above the 1.1× goal: {', '.join(above) or 'none'})" in row)


def test_the_readme_quotes_the_fashion_mnist_reference_record():
    import json  # pylint: disable=import-outside-toplevel
    record = json.loads((ROOT / "docs" / "results" / "fashion_mnist_reference.json").read_text())
    row = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| Fashion-MNIST")][0]
    assert f"**{100 * record['final']['ema_top_1_acc']:.2f}%** test top-1" in row
    assert f"target ≥ {100 * record['target_top_1']:.0f}%" in row
    assert f"after {record['train']['epochs']:g} epochs" in row
    assert f"a {record['model']['params']:,}-parameter NFNet" in row


def test_the_readme_states_the_nfnet_verdicts_the_memory_plans_records_give():
    from experiments import generated_section, memory_plan_page  # pylint: disable=import-outside-toplevel
    records = generated_section.read_json_lines(ROOT / "docs" / "memory_plan.jsonl")
    nfnets = {key: compiles for key, compiles in memory_plan_page.latest(records).items()
              if memory_plan_page.SECTIONS["nfnet"](key[0])}
    row = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| Train-step memory")][0]
    assert memory_plan_page.verdicts(nfnets, "tpu-v3") in row, (
        "README's memory row must quote the verdicts docs/memory_plan.md renders from its records")
