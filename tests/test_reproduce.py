"""`python -m experiments.reproduce`: the study's rules against hand-worked cases (seed
statistics, the λ-bracketing rule, the sub-claim verdicts, resumable runs, the Fashion-MNIST
downsampling), every claim's machinery end to end at tiny sizes (`--quick`), and the page's
promise that every number on it is in the JSON it was rendered from, on the committed page
and on a fresh one."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import reproduce, reproduction_page
from nfnets_jax.analysis import in_memory_training
from nfnets_jax.analysis import signal_propagation as spp
from nfnets_jax.optim import agc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- every number on the page is in the JSON

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NOT_FIGURES = (
    re.compile(r"!\[[^\]]*\]\([^)]*\)"),  # image links: file names
    re.compile(r"^#+ \d+\.", re.M),  # section numbers
    re.compile(r"§\d+(?:\.\d+)*|Fig\. \d+|Table \d+"),  # references to the paper
)


def page_numbers(text: str) -> list[str]:
    """Every number written on the page, except file names, section numbers and references."""
    for pattern in _NOT_FIGURES:
        text = pattern.sub(" ", text)
    return _NUMBER.findall(text)


def json_renderings(records) -> set[str]:
    """Every way the page may write a value of the JSON records: each number as itself, in %,
    ms, MiB or minutes, to 0–4 decimals or 3–4 significant digits (in fixed notation too), and
    every number inside a string or key (commands, versions, labels)."""
    allowed: set[str] = set()

    def number(value: float) -> None:
        if not math.isfinite(value):
            return
        for scale in (1.0, 100.0, 1e3, 1 / 2**20, 1 / 60):
            x = abs(value) * scale
            allowed.update(f"{x:.{digits}f}" for digits in range(5))
            allowed.update({f"{x:g}", f"{x:.3g}", f"{x:.4g}", f"{x:,.0f}"})
            if 0 < x < 1:  # 3–4 significant digits without an exponent: 7.07e-05 as 0.0000707
                leading = -math.floor(math.log10(x)) - 1
                allowed.update(f"{x:.{leading + digits}f}" for digits in (3, 4))

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                allowed.update(_NUMBER.findall(str(key)))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, bool) or node is None:
            return
        elif isinstance(node, (int, float)):
            number(float(node))
        elif isinstance(node, str):
            allowed.update(_NUMBER.findall(node))

    walk(records)
    return allowed


def numbers_not_in_json(page: str, records) -> list[str]:
    allowed = json_renderings(records)
    return sorted({n for n in page_numbers(page) if n not in allowed})


def _claim_records(folder: str) -> list:
    records = []
    for claim in reproduce.CLAIMS:
        path = os.path.join(folder, f"{claim}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
    return records


def test_the_number_check_catches_a_number_that_is_not_in_the_json():
    records = [{"accuracy": 0.8123, "seconds": 90.0, "command": "python -m x --only agc"}]
    assert numbers_not_in_json("81.23 % in 1.5 min, `python -m x`", records) == []
    assert numbers_not_in_json("81.23 % vs 80.9 %", records) == ["80.9"]
    assert numbers_not_in_json("see §4.1, Fig. 2 and ![a](reproduction/x_42.png)", records) == []


def test_every_number_on_the_committed_page_is_in_its_json():
    folder = os.path.join(REPO, "docs", "reproduction")
    with open(os.path.join(REPO, "docs", "reproduction.md"), encoding="utf-8") as f:
        page = f.read()
    records = _claim_records(folder)
    assert numbers_not_in_json(page, records) == []
    # The committed page is exactly what the committed JSON renders to: nobody edited it by hand.
    assert page == reproduction_page.render(folder, os.path.join(REPO, "docs", "reproduction.md"))


def test_the_committed_verdicts_are_what_the_rules_compute_from_the_committed_measurements():
    # The page renders the verdicts stored in each JSON; recomputing them from the same JSON's
    # measurements must give them back, so a rule changed without rerunning cannot leave stale text.
    for record in _claim_records(os.path.join(REPO, "docs", "reproduction")):
        claim = record["claim"]
        if claim in reproduce.VERDICTS:
            recomputed = json.loads(json.dumps(reproduce._jsonable(reproduce.VERDICTS[claim](record))))  # pylint: disable=protected-access
            assert recomputed == record["verdicts"], claim


def test_the_glance_table_gives_each_section_verdict_and_a_missing_claim_leaves_no_row(tmp_path):
    folder = os.path.join(REPO, "docs", "reproduction")
    with open(os.path.join(folder, "agc.json"), encoding="utf-8") as f:
        agc_record = json.load(f)
    page = reproduction_page.render(folder, os.path.join(REPO, "docs", "reproduction.md"))
    glance = page.split("## The verdicts at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in glance.splitlines() if line.startswith("| AGC vs batch, same epochs")]
    v = agc_record["verdicts"]
    expected = ["yes" if v["bn_across_batches"]["enough_steps"] else "no", v["unclipped_degrades"]["answer"],
                v["agc_matches_bn"]["answer"], v["smaller_lambda_at_larger_batch"]["answer"]]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == [f"**{answer}**" for answer in expected]
    # Only the agc claim present: the glance table has its rows and no other study's.
    only = tmp_path / "only"
    only.mkdir()
    with open(only / "agc.json", "w", encoding="utf-8") as f:
        json.dump(agc_record, f)
    partial = reproduction_page.render(str(only), str(tmp_path / "page"))  # only its folder is used
    glance = partial.split("## The verdicts at a glance", 1)[1].split("\n## ", 1)[0]
    assert "| AGC vs batch, same epochs" in glance and "| NF vs BN" not in glance


# ---------------------------------------------------------------- the study's rules, by hand

def test_seed_summary_is_mean_and_sample_sd_over_all_seeds_with_best_n_minus_1_beside():
    summary = reproduce.seed_summary([0.8, 0.9, 0.7])
    assert summary["mean"] == pytest.approx(0.8)
    assert summary["sd"] == pytest.approx(0.1)  # sqrt((0 + 0.01 + 0.01) / 2)
    assert summary["best_n_minus_1_mean"] == pytest.approx(0.85)
    assert reproduce.seed_summary([0.5])["sd"] == 0.0


def test_differs_compares_the_gap_with_the_sum_of_the_standard_deviations():
    a, b = {"mean": 0.80, "sd": 0.01}, {"mean": 0.75, "sd": 0.02}
    assert reproduce.differs(a, b) == {"difference": pytest.approx(0.05), "spread": pytest.approx(0.03),
                                       "exceeds_spread": True}
    assert not reproduce.differs(a, {"mean": 0.78, "sd": 0.02})["exceeds_spread"]


def test_next_clipping_extends_the_grid_until_the_best_is_bracketed():
    assert reproduce.next_clipping({0.01: 0.5, 0.02: 0.6, 0.04: 0.7, math.inf: 0.1}) == pytest.approx(0.08)
    assert reproduce.next_clipping({0.01: 0.7, 0.02: 0.6}) == pytest.approx(0.005)
    assert reproduce.next_clipping({0.01: 0.5, 0.02: 0.7, 0.04: 0.6}) is None
    assert reproduce.next_clipping({0.04: 0.7}) is None


def _row(series, model, clipping, batch, accs, diverged=0.0):
    return {"series": series, "model": model, "clipping": clipping, "batch": batch, "steps": 100,
            "accuracy": reproduce.seed_summary(accs), "diverged_fraction": diverged}


def test_agc_verdicts_on_a_hand_made_grid():
    rows = [
        # batch 256: no AGC fine, best λ 0.08 (bracketed by 0.04 and 0.16), BN equal within spread
        _row("no AGC", "nf", 0.0, 256, [0.85, 0.86, 0.84]),
        _row("λ=0.04", "nf", 0.04, 256, [0.80, 0.81, 0.82]),
        _row("λ=0.08", "nf", 0.08, 256, [0.86, 0.87, 0.85]),
        _row("λ=0.16", "nf", 0.16, 256, [0.84, 0.85, 0.83]),
        _row("BN", "bn", None, 256, [0.87, 0.86, 0.88]),
        # batch 4096: no AGC diverges, best λ 0.02, BN clearly better but clearly below its batch-256 self
        _row("no AGC", "nf", 0.0, 4096, [0.10, 0.10, 0.10], diverged=1.0),
        _row("λ=0.01", "nf", 0.01, 4096, [0.70, 0.71, 0.72]),
        _row("λ=0.02", "nf", 0.02, 4096, [0.75, 0.76, 0.74]),
        _row("λ=0.04", "nf", 0.04, 4096, [0.72, 0.73, 0.74]),
        _row("λ=0.08", "nf", 0.08, 4096, [0.60, 0.61, 0.62]),
        _row("BN", "bn", None, 4096, [0.80, 0.79, 0.81]),
    ]
    v = reproduce.agc_verdicts(rows)
    assert v["unclipped_degrades"]["answer"] == "yes"
    assert v["unclipped_degrades"]["difference"] == pytest.approx(0.75)
    matches = v["agc_matches_bn"]
    assert matches["answer"] == "partly" and matches["matched_batches"] == [256]
    assert matches["by_batch"][4096]["difference"] == pytest.approx(0.05)  # BN 0.80 − λ=0.02 0.75
    # BN loses 0.07 from batch 256 to 4096, more than its spread 0.02: too few steps at 4096.
    assert not v["bn_across_batches"]["enough_steps"]
    assert v["bn_across_batches"]["difference"] == pytest.approx(0.07)
    smaller = v["smaller_lambda_at_larger_batch"]
    assert smaller["best_by_batch"] == {256: 0.08, 4096: 0.02}
    # At 4096, λ=0.08 (256's best) scores 0.61 against 0.75: far beyond the spread.
    assert smaller["answer"] == "yes" and smaller["penalty"]["difference"] == pytest.approx(0.14)
    assert v["bracketed"] == {256: True, 4096: True}
    assert v["no_agc_vs_best_clipping_at_smallest_batch"]["difference"] == pytest.approx(-0.01)  # 0.85 − 0.86
    assert v["at_chance"][4096]["no AGC"] == 1.0 and v["at_chance"][4096]["λ=0.08"] == 0.0


def test_agc_verdicts_say_no_when_the_best_lambda_grows_with_the_batch():
    rows = [_row("λ=0.01", "nf", 0.01, 256, [0.9, 0.9, 0.9]), _row("λ=0.02", "nf", 0.02, 256, [0.8, 0.8, 0.8]),
            _row("λ=0.01", "nf", 0.01, 1024, [0.7, 0.7, 0.7]), _row("λ=0.02", "nf", 0.02, 1024, [0.8, 0.8, 0.8])]
    v = reproduce.agc_verdicts(rows)
    assert v["smaller_lambda_at_larger_batch"]["answer"] == "no"
    assert v["bracketed"] == {256: False, 1024: False}


def test_equal_steps_pairs_the_largest_batch_with_the_study_batch_that_had_its_step_count():
    def at(steps, *rows):
        return [dict(row, steps=steps) for row in rows]

    study = {"command": "python -m experiments.reproduce", "rows":
             at(400, _row("BN", "bn", None, 256, [0.87, 0.86, 0.88]), _row("no AGC", "nf", 0.0, 256, [0.85] * 3))
             + at(100, _row("BN", "bn", None, 1024, [0.86, 0.87, 0.85]), _row("no AGC", "nf", 0.0, 1024, [0.1] * 3),
                  _row("λ=0.02", "nf", 0.02, 1024, [0.80, 0.81, 0.79]))
             + at(25, _row("BN", "bn", None, 4096, [0.70, 0.71, 0.72]))}
    # batch 4096 again, for 4x the epochs: 100 steps, as batch 1024 had in the study
    record = {"rows": at(100, _row("BN", "bn", None, 4096, [0.86, 0.85, 0.87]),
                         _row("no AGC", "nf", 0.0, 4096, [0.1] * 3, diverged=1.0),
                         _row("λ=0.02", "nf", 0.02, 4096, [0.84, 0.85, 0.86]))}
    merged = reproduce.equal_steps_record(record, study)
    verdicts = reproduce.VERDICTS["agc_steps"](merged)  # what main stores with the record
    assert merged["reference_batches"] == [1024]
    check = verdicts["bn_across_batches"]
    # BN at 1024 and 4096, both 100 steps: 0.86 vs 0.86, no loss, so the steps suffice.
    assert (check["small_batch"], check["large_batch"], check["steps_small"], check["steps_large"]) == (1024, 4096, 100, 100)
    assert check["enough_steps"] and check["difference"] == pytest.approx(0.0, abs=1e-9)
    gap = verdicts["agc_matches_bn"]["by_batch"][4096]  # BN 0.86 − λ=0.02 0.85, spread 0.02
    assert gap["difference"] == pytest.approx(0.01) and gap["matches"]
    # Without AGC the NF-ResNet is at chance already at batch 1024: nothing left to degrade, and no
    # "where nothing diverges" comparison at that batch.
    assert verdicts["unclipped_degrades"]["answer"] == "not tested"
    assert "no_agc_vs_best_clipping_at_smallest_batch" not in verdicts


def test_smaller_lambda_is_partly_when_the_small_batchs_best_lambda_was_not_run_at_the_large_batch():
    rows = [_row("λ=0.08", "nf", 0.08, 256, [0.80] * 3), _row("λ=0.16", "nf", 0.16, 256, [0.85] * 3),
            _row("λ=0.32", "nf", 0.32, 256, [0.82] * 3),
            _row("λ=0.01", "nf", 0.01, 4096, [0.70] * 3), _row("λ=0.02", "nf", 0.02, 4096, [0.75] * 3),
            _row("λ=0.04", "nf", 0.04, 4096, [0.72] * 3)]
    smaller = reproduce.agc_verdicts(rows)["smaller_lambda_at_larger_batch"]
    # 0.16 → 0.02: the order holds, but λ=0.16 was never run at 4096, so its cost there is unknown.
    assert smaller["answer"] == "partly" and "penalty" not in smaller
    assert (smaller["small_batch_clipping"], smaller["large_batch_clipping"]) == (0.16, 0.02)


def test_agc_steps_without_an_agc_study_is_one_line_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "agc_steps", "--out", str(tmp_path)])
    assert "lacks" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_cached_run_computes_once_and_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "run.json")
    calls = []

    def compute():
        calls.append(1)
        return {"test_acc": 0.5}

    assert reproduce.cached_run(path, compute) == ({"test_acc": 0.5}, True)
    assert reproduce.cached_run(path, compute) == ({"test_acc": 0.5}, False)
    assert len(calls) == 1 and os.listdir(tmp_path) == ["run.json"]

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce.cached_run(str(tmp_path / "other.json"), killed)
    assert os.listdir(tmp_path) == ["run.json"]


def test_settings_key_changes_with_what_shapes_a_run_only():
    base = reproduce.AgcSettings()
    fields = ("epochs", "width")
    assert reproduce.settings_key(base, fields) == reproduce.settings_key(
        reproduce.AgcSettings(batches=(256,)), fields)
    assert reproduce.settings_key(base, fields) != reproduce.settings_key(reproduce.AgcSettings(epochs=3.0), fields)


def test_downsample_averages_blocks_when_the_size_divides():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    out = in_memory_training.downsample(images, 2)
    assert out.shape == (2, 2, 2, 1)
    assert out[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert out[1, 1, 1, 0] == pytest.approx((26 + 27 + 30 + 31) / 4)


# ---------------------------------------------------------------- pieces the study is built from

def test_smooth_probe_is_standardised_and_spatially_correlated():
    images = np.asarray(spp.smooth_images(4, 32, seed=0, correlation_px=3.0))
    assert images.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    neighbour = np.mean(images[:, :, 1:] * images[:, :, :-1])  # lag-1 autocorrelation
    # A Gaussian blur of σ px turns white noise into a field with correlation exp(−d²/(4σ²)).
    assert neighbour == pytest.approx(math.exp(-1 / (4 * 3.0**2)), abs=0.03)
    white = np.asarray(spp.gaussian_images(4, 32, seed=0))
    assert abs(np.mean(white[:, :, 1:] * white[:, :, :-1])) < 0.03


def test_agc_with_a_traced_clipping_matches_a_number_and_inf_is_no_clipping():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    grads = {"w": jnp.full((3, 4), 0.5), "b": jnp.full((4,), 0.01)}
    as_number, _ = agc.adaptive_grad_clip(0.1).update(grads, agc.adaptive_grad_clip(0.1).init(params), params)

    def traced(clipping):
        transform = agc.adaptive_grad_clip(clipping)
        return transform.update(grads, transform.init(params), params)[0]

    jax.tree.map(np.testing.assert_allclose, jax.jit(traced)(jnp.float32(0.1)), as_number)
    jax.tree.map(np.testing.assert_allclose, jax.jit(traced)(jnp.float32(jnp.inf)), grads)


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_quick_mode_writes_every_claim_and_the_page_and_resumes(tmp_path):
    out = str(tmp_path / "repro")
    summary = reproduce.main(["--quick", "--out", out])
    assert set(summary["json"]) == set(reproduce.CLAIMS)
    for claim, path in summary["json"].items():
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        assert record["quick"] and record["complete"] and record["versions"]["jax"] == jax.__version__
        for figure in record["figures"]:
            assert os.path.getsize(os.path.join(out, os.path.basename(figure))) > 1000
    with open(os.path.join(out, "agc.json"), encoding="utf-8") as f:
        agc_record = json.load(f)
    settings = reproduce.QUICK["agc"]
    # Per batch: BN, no AGC and each λ of the grid, plus at most max_extensions added λ, per seed.
    per_batch = {b: [r for r in agc_record["runs"] if r["batch"] == b] for b in settings.batches}
    for runs in per_batch.values():
        planned = (2 + len(settings.clippings)) * len(settings.seeds)
        assert planned <= len(runs) <= planned + settings.max_extensions * len(settings.seeds)
    assert all(0.0 <= run["test_acc"] <= 1.0 for run in agc_record["runs"])
    clipped = [r for r in agc_record["rows"] if r["model"] == "nf" and r["clipping"]]
    assert clipped and all(0.0 <= f <= 1.0 for r in clipped for f in r["clip_fraction"].values())
    page = open(summary["doc"], encoding="utf-8").read()
    for heading in ("## 1.", "## 1b.", "## 2.", "## 3.", "## 4."):
        assert heading in page
    assert "--quick" in page
    assert numbers_not_in_json(page, _claim_records(out)) == []
    # A second run finds every training run stored: it trains nothing and gives the same numbers.
    stored = sorted(os.listdir(os.path.join(out, "runs")))
    reproduce.main(["--quick", "--only", "agc", "--out", out])
    with open(os.path.join(out, "agc.json"), encoding="utf-8") as f:
        again = json.load(f)
    assert sorted(os.listdir(os.path.join(out, "runs"))) == stored
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in agc_record["runs"]]


def test_unknown_claim_is_rejected_before_any_work(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "agc,speed"])
    assert "--only takes" in capsys.readouterr().err


def test_a_bad_batch_is_rejected_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "agc", "--agc_batches", "256,300", "--out", str(tmp_path)])
    assert "--agc_batches" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_nf_vs_bn_verdicts_count_the_repeats_where_bn_is_slower():
    record = {"time_ratio_per_repeat": [1.1, 0.9, 1.2], "time_ratio_bn_over_nf": 1.1, "memory_ratio_bn_over_nf": 1.3,
              "results": {"NF": {"accuracy": {"mean": 0.88, "sd": 0.01}},
                          "BN": {"accuracy": {"mean": 0.89, "sd": 0.01}}}}
    v = reproduce.nf_vs_bn_verdicts(record)
    assert v["time"]["repeats_bn_slower"] == 2 and not v["time"]["consistent"]
    assert v["accuracy"]["difference"] == pytest.approx(-0.01) and not v["accuracy"]["exceeds_spread"]
    record["time_ratio_per_repeat"] = [1.1, 1.05, 1.2]
    assert reproduce.nf_vs_bn_verdicts(record)["time"]["consistent"]
