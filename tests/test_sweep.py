"""cnnbal sweep: cross-validated choice of r_low, r_high, beta, alpha (issue 3).

The fast sweep must agree with the plain loop (fit_elaborated, apply_correction,
compare per configuration and fold); the choice must only ever see VAL.
"""

from __future__ import annotations

import builtins
import json
import warnings

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cnnbal.artifact import load_artifact
from cnnbal.core import FitParams, apply_correction, fit_elaborated
from cnnbal.errors import CnnbalError
from cnnbal.metrics import compare
from cnnbal.sweep import (
    DEFAULT_GRID,
    PARAM_NAMES,
    SCORE_NAMES,
    Choice,
    _as_float64_rows,
    _fold_fits,
    _group_configs,
    choose,
    curve_configs,
    grid_configs,
    run_sweep,
    stratified_folds,
)

# ---------------------------------------------------------------- synthetic data


def make_outputs(n_samples=600, n_classes=6, seed=0, dtype=np.float32):
    """Softmax outputs of a fake classifier whose last classes are weak.

    Tuned so that on the SMALL grid some configurations gain on worst20 and
    others lose too much total accuracy to be eligible.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % n_classes
    rng.shuffle(labels)
    strength = np.linspace(4.0, 1.5, n_classes)  # class 0 easy ... last class hard
    logits = rng.normal(size=(n_samples, n_classes))
    logits[np.arange(n_samples), labels] += strength[labels]
    # a confusable pair: the weak last class leaks into its neighbour
    logits[:, n_classes - 2] += 1.5 * (labels == n_classes - 1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(dtype), labels.astype(np.int64)


@pytest.fixture(scope="module")
def data():
    return make_outputs()


@pytest.fixture
def files(tmp_path, data):
    probs, labels = data
    val = tmp_path / "val.npz"
    np.savez(val, probs=probs, labels=labels)
    test_probs, test_labels = make_outputs(n_samples=480, seed=7)
    test = tmp_path / "test.npz"
    np.savez(test, probs=test_probs, labels=test_labels)
    return tmp_path, val, test


def plain_loop(probs, labels, configs, n_folds, seed):
    """The definition: refit from scratch per configuration and fold, public functions only."""
    scores = np.empty((len(configs), n_folds, len(SCORE_NAMES)))
    hs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (train, test) in enumerate(stratified_folds(labels, n_folds, seed)):
            for i, config in enumerate(configs):
                result = fit_elaborated(probs[train], labels[train], config)
                corrected = apply_correction(result.H, probs[test], gate=result.apply_gate)
                comparison = compare(
                    probs[test], corrected, labels[test], val_class_accuracy=result.class_accuracy
                )
                scores[i, k] = [comparison.metrics[name][1] for name in SCORE_NAMES]
                hs[i, k] = result.H
    return scores, hs


SOME_CONFIGS = (
    FitParams(0.1, 0.8, 1.5, 3.0),
    FitParams(0.05, 0.7, 1.0, 2.0),
    FitParams(0.05, 0.7, 1.0, 4.0),  # same system as above, another alpha
    FitParams(0.05, 0.7, 2.0, 4.0),  # same competitive set, another beta
    FitParams(0.15, 0.9, 0.0, 0.5),
    FitParams(0.3, 0.95, 3.0, 1.5),  # alpha near 1 is degenerate: see the alpha test
    FitParams(0.6, 0.5, 1.5, 3.0),  # r_low >= r_high: empty competitive set, identity
)


# ---------------------------------------------------------------- agreement with the plain refit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sweep_equals_plain_refit(dtype):
    probs, labels = make_outputs(dtype=dtype)
    result = run_sweep(probs, labels, SOME_CONFIGS, n_folds=4, seed=3)
    expected, _ = plain_loop(probs, labels, SOME_CONFIGS, 4, 3)
    np.testing.assert_allclose(result.fold_scores, expected, rtol=0, atol=1e-8)


def test_each_h_equals_fit_elaborated(data):
    probs, labels = data
    folds = stratified_folds(labels, 3, 1)
    _, expected = plain_loop(probs, labels, SOME_CONFIGS, 3, 1)
    steps = _fold_fits(
        probs, _as_float64_rows(probs), labels, folds, _group_configs(SOME_CONFIGS), 6
    )
    seen = 0
    for step in steps:
        if step.config_index is None:
            continue
        np.testing.assert_allclose(
            step.H, expected[step.config_index, step.fold_index], rtol=0, atol=1e-8
        )
        seen += 1
    assert seen == len(SOME_CONFIGS) * 3


def test_grid_sweep_equals_plain_refit_on_a_grid(data):
    probs, labels = data
    configs = grid_configs([0.05, 0.2], [0.6, 0.9], [1.0, 2.0], [1.0, 3.0])
    result = run_sweep(probs, labels, configs, n_folds=3, seed=0)
    expected, _ = plain_loop(probs, labels, configs, 3, 0)
    np.testing.assert_allclose(result.fold_scores, expected, rtol=0, atol=1e-8)


def test_alpha_near_one_is_flagged(data):
    # padding rows [alpha e_k, 1] are orthogonal to [1 .. 1 -1] at alpha = 1, as are
    # the sample rows: H is then not unique along that direction
    probs, labels = data
    result = run_sweep(probs, labels, [FitParams(0.1, 0.8, 1.5, 1.0)], n_folds=2)
    assert any("alpha" in note and "1" in note for note in result.warnings)


def test_raw_scores_are_the_uncorrected_outputs(data):
    probs, labels = data
    result = run_sweep(probs, labels, SOME_CONFIGS[-1:], n_folds=3)
    # the empty competitive set gives the identity: exactly raw
    np.testing.assert_array_equal(result.fold_scores[0], result.raw_fold_scores)
    assert result.n_competitive[0].tolist() == [0, 0, 0]
    assert any("empty competitive set" in note for note in result.warnings)


def test_progress_reports_every_fit(data):
    probs, labels = data
    calls = []
    run_sweep(
        probs, labels, SOME_CONFIGS[:3], n_folds=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, 6) for i in range(1, 7)]


# ---------------------------------------------------------------- folds


def test_stratified_folds_split_every_class_evenly():
    labels = np.repeat(np.arange(5), [50, 31, 7, 3, 12])
    folds = stratified_folds(labels, 5, seed=0)
    held_out = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(held_out), np.arange(len(labels)))  # disjoint and covering
    per_fold = np.array([np.bincount(labels[test], minlength=5) for _, test in folds])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 1
    for train, test in folds:
        assert np.intersect1d(train, test).size == 0
        assert len(train) + len(test) == len(labels)


def test_stratified_folds_are_deterministic_per_seed():
    labels = np.arange(200) % 4
    a = stratified_folds(labels, 4, seed=5)
    b = stratified_folds(labels, 4, seed=5)
    c = stratified_folds(labels, 4, seed=6)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 25), min_size=2, max_size=8),
    n_folds=st.integers(2, 7),
    seed=st.integers(0, 2**31),
)
def test_stratified_folds_properties(counts, n_folds, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    if len(labels) < n_folds:
        with pytest.raises(CnnbalError):
            stratified_folds(labels, n_folds, seed)
        return
    folds = stratified_folds(labels, n_folds, seed)
    assert len(folds) == n_folds
    assert all(len(test) > 0 and len(train) > 0 for train, test in folds)
    held_out = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(held_out), np.arange(len(labels)))
    per_fold = np.array([np.bincount(labels[test], minlength=len(counts)) for _, test in folds])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()


@pytest.mark.parametrize("n_folds", [0, 1, 11])
def test_stratified_folds_refuse_bad_counts(n_folds):
    with pytest.raises(CnnbalError, match="folds"):
        stratified_folds(np.arange(10) % 2, n_folds, 0)


# ---------------------------------------------------------------- configurations


def test_default_grid_is_81_combinations():
    configs = grid_configs()
    assert len(configs) == 81 == len(set(configs))
    assert {c.r_low for c in configs} == set(DEFAULT_GRID["r_low"])
    assert FitParams() in configs  # the paper's values


def test_grid_drops_empty_competitive_sets_and_checks_ranges():
    configs = grid_configs([0.1, 0.5], [0.4, 0.9], [1.0], [3.0])
    assert [(c.r_low, c.r_high) for c in configs] == [(0.1, 0.4), (0.1, 0.9), (0.5, 0.9)]
    with pytest.raises(CnnbalError, match="r-low"):
        grid_configs([1.5], [0.9], [1.0], [3.0])
    with pytest.raises(CnnbalError, match="alpha"):
        grid_configs([0.1], [0.9], [1.0], [-1.0])
    with pytest.raises(CnnbalError, match="r_low >= r_high"):
        grid_configs([0.9], [0.5], [1.0], [3.0])


def test_curves_are_four_lines_through_the_center():
    center = FitParams(0.1, 0.8, 1.5, 3.0)
    grid = {"r_low": [0.05, 0.2], "r_high": [0.7, 0.8, 0.9], "beta": [1.0], "alpha": [2.0, 4.0]}
    configs = curve_configs(center, **grid)
    assert configs[0] == center
    assert configs.count(center) == 1
    # one-at-a-time: every other configuration differs from the centre in exactly one parameter
    for config in configs[1:]:
        differs = [n for n in PARAM_NAMES if getattr(config, n) != getattr(center, n)]
        assert len(differs) == 1
    for name, values in grid.items():
        line = {getattr(c, name) for c in configs}
        assert line == {*values, getattr(center, name)}
    assert len(configs) == 1 + 2 + 2 + 1 + 2


# ---------------------------------------------------------------- the choice


def fake_scores(config_totals, config_objectives, raw_total=0.80, raw_objective=0.50, folds=3):
    """Fold scores whose means are the given totals and worst20 values."""
    n = len(config_totals)
    fold_scores = np.zeros((n, folds, len(SCORE_NAMES)))
    total, worst = SCORE_NAMES.index("total_accuracy"), SCORE_NAMES.index("worst20_accuracy")
    fold_scores[:, :, total] = np.asarray(config_totals)[:, None]
    fold_scores[:, :, worst] = np.asarray(config_objectives)[:, None]
    raw = np.zeros((folds, len(SCORE_NAMES)))
    raw[:, total], raw[:, worst] = raw_total, raw_objective
    return fold_scores, raw


def test_choice_respects_max_total_drop():
    # config 0: best objective but loses 1 point of total; config 1: smaller gain, loses 0.2
    fold_scores, raw = fake_scores([0.79, 0.798], [0.60, 0.55])
    assert choose(fold_scores, raw, max_total_drop=0.5).index == 1
    assert choose(fold_scores, raw, max_total_drop=1.0).index == 0
    strict = choose(fold_scores, raw, max_total_drop=0.1)
    assert strict.index is None and not strict.beats_raw
    assert strict.eligible.tolist() == [False, False]


def test_choice_can_be_raw():
    fold_scores, raw = fake_scores([0.80, 0.80], [0.49, 0.50])
    choice = choose(fold_scores, raw)
    assert choice.index == 1  # the best eligible ...
    assert not choice.beats_raw  # ... only ties raw: raw is the recommendation


def test_choice_ties_go_to_higher_total_then_first():
    fold_scores, raw = fake_scores([0.799, 0.801, 0.801], [0.55, 0.55, 0.55])
    assert choose(fold_scores, raw).index == 1


def test_choice_objectives_and_rechoosing(data):
    probs, labels = data
    result = run_sweep(probs, labels, grid_configs([0.05, 0.1], [0.8], [1.0, 2.0], [2.0, 3.0]))
    for objective, score in (("total", "total_accuracy"), ("balanced", "balanced_accuracy")):
        again = result.with_choice(objective=objective, max_total_drop=float("inf"))
        assert again.chosen == again.configs[int(np.argmax(again.mean(score)))]
    with pytest.raises(CnnbalError, match="objective"):
        result.with_choice(objective="accuracy")


def test_result_summaries(data):
    probs, labels = data
    grid = {"r_low": [0.05, 0.1], "r_high": [0.7, 0.8], "beta": [1.0, 2.0], "alpha": [2.0, 3.0]}
    result = run_sweep(probs, labels, grid_configs(**grid), n_folds=3)
    anchor = result.anchor()
    assert anchor == result.chosen
    for name, indices in result.slices().items():
        line = [result.configs[i] for i in indices]
        assert [getattr(c, name) for c in line] == grid[name]  # a slice through the anchor
        others = [n for n in PARAM_NAMES if n != name]
        assert all(getattr(c, o) == getattr(anchor, o) for c in line for o in others)
    for name, side in result.edge_parameters().items():
        assert getattr(result.chosen, name) == grid[name][0 if side == "lowest" else -1]
    payload = json.loads(json.dumps(result.to_dict()))
    assert len(payload["configs"]) == 16
    assert len(payload["configs"][0]["scores"]["worst20_accuracy"]["folds"]) == 3
    ranked = result.ranking()
    assert sorted(ranked.tolist()) == list(range(16))
    assert ranked[0] == result.choice.index
    assert result.eligible[ranked[: result.eligible.sum()]].all()


# ---------------------------------------------------------------- the command


def make_app():
    from cnnbal.cli_sweep import sweep_command

    app = typer.Typer()
    app.command("sweep")(sweep_command)

    @app.command("version")
    def version():  # a second command, so that "sweep" is a subcommand as in cnnbal
        typer.echo("test")

    return app


runner = CliRunner()
SMALL = ["--r-low", "0.05,0.15", "--r-high", "0.7,0.9", "--beta", "1,2", "--alpha", "2,4"]


def invoke(*args):
    return runner.invoke(make_app(), ["sweep", *map(str, args)])


def sweep_json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_synthetic_data_exercise_the_choice(data):
    probs, labels = data
    result = run_sweep(probs, labels, grid_configs([0.05, 0.15], [0.7, 0.9], [1, 2], [2, 4]))
    assert 0 < result.eligible.sum() < len(result.configs)
    assert result.choice.beats_raw


def test_cli_json_structure(files):
    _, val, _ = files
    payload = sweep_json(val, *SMALL, "--folds", 3)
    sweep = payload["sweep"]
    assert sweep["objective"] == "worst20" and sweep["n_folds"] == 3
    assert len(sweep["configs"]) == 16 and sweep["n_configs"] == 16
    config = sweep["configs"][0]
    assert set(config["params"]) == set(PARAM_NAMES)
    assert set(config["scores"]) == set(SCORE_NAMES)
    assert {"mean", "std", "folds"} <= set(config["scores"]["total_accuracy"])
    assert set(sweep["raw"]) == set(SCORE_NAMES)
    assert payload["test"] is None and payload["output"] is None
    assert payload["grid"]["beta"] == [1.0, 2.0]
    assert sweep["decision"] in ("corrected", "raw")


def test_cli_human_output_names_the_choice(files):
    _, val, _ = files
    result = invoke(val, *SMALL, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "raw" in result.stdout and "worst20" in result.stdout
    assert ("Chosen" in result.stdout) or ("No configuration" in result.stdout)


def test_cli_test_set_never_influences_the_choice(files, tmp_path):
    _, val, test = files
    plain = sweep_json(val, *SMALL)
    with_test = sweep_json(val, *SMALL, "--test", test)
    # a scrambled test file: labels permuted, scores shuffled
    with np.load(test) as archive:
        probs, labels = archive["probs"], archive["labels"]
    rng = np.random.default_rng(1)
    scrambled = tmp_path / "scrambled.npz"
    np.savez(scrambled, probs=probs[rng.permutation(len(probs))], labels=rng.permutation(labels))
    with_scrambled = sweep_json(val, *SMALL, "--test", scrambled)
    assert plain["sweep"] == with_test["sweep"] == with_scrambled["sweep"]
    assert with_test["test"]["params"] == plain["sweep"]["chosen"]
    assert with_test["test"]["metrics"] != with_scrambled["test"]["metrics"]
    assert set(with_test["test"]["metrics"]["worst20_accuracy"]) == {"raw", "corrected"}


def test_cli_writes_artifact_with_sweep_provenance(files, data):
    tmp, val, _ = files
    out = tmp / "H.npz"
    payload = sweep_json(val, *SMALL, "-o", out, "--max-total-drop", "100")
    chosen = payload["sweep"]["chosen"]
    assert chosen is not None and payload["output"] == str(out)
    artifact = load_artifact(out)
    sweep = artifact.provenance["sweep"]
    assert sweep["chosen"] == chosen == artifact.params
    assert sweep["objective"] == "worst20" and sweep["n_folds"] == 5 and sweep["seed"] == 0
    assert sweep["grid"]["alpha"] == [2.0, 4.0]
    assert len(sweep["cv_means"]) == 16
    assert "worst20_accuracy" in sweep["chosen_scores"]
    probs, labels = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = fit_elaborated(probs, labels, FitParams(**chosen))
    np.testing.assert_allclose(artifact.H, refit.H, atol=1e-12)
    assert artifact.input_name == "val.npz" and len(artifact.input_sha256) == 64


def test_cli_no_eligible_configuration_writes_nothing(files, monkeypatch):
    import cnnbal.sweep as sweep_module

    tmp, val, _ = files

    def nothing_eligible(fold_scores, raw_fold_scores, **kwargs):
        return Choice(np.zeros(len(fold_scores), bool), None, False)

    monkeypatch.setattr(sweep_module, "choose", nothing_eligible)
    out = tmp / "H.npz"
    result = invoke(val, *SMALL, "-o", out)
    assert result.exit_code == 1
    assert "No configuration is eligible" in result.stdout
    assert "Nothing written" in result.stderr and "FAILED: sweep" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--r-low", "0.1,abc"], "--r-low"),
        (["--r-low", "1.5"], "--r-low"),
        (["--beta", ""], "--beta"),
        (["--center", "0.1,0.8,1.5"], "--center"),
        (["--folds", "1"], "--folds"),
        (["--max-total-drop", "-1"], "--max-total-drop"),
    ],
)
def test_cli_bad_flags_exit_2(files, args, message):
    _, val, _ = files
    result = invoke(val, *args)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_unknown_objective_and_missing_files_exit_2(files):
    tmp, val, _ = files
    assert invoke(val, "--objective", "accuracy").exit_code == 2
    missing = invoke(tmp / "nope.npz")
    assert missing.exit_code == 2 and "no such file" in missing.output
    assert invoke(val, "--test", tmp / "nope.npz").exit_code == 2
    no_dir = invoke(val, "-o", tmp / "no" / "H.npz")
    assert no_dir.exit_code == 2 and "does not exist" in no_dir.output
    same = invoke(val, "-o", val)
    assert same.exit_code == 2 and "refusing to overwrite" in same.output


def test_cli_curves_mode(files):
    _, val, _ = files
    payload = sweep_json(val, "--mode", "curves", "--center", "0.1,0.8,1.5,3", "--folds", 3)
    sweep = payload["sweep"]
    assert sweep["mode"] == "curves" and sweep["center"]["alpha"] == 3.0
    assert sweep["n_configs"] == 9  # the centre + 2 more values on each of 4 lines


def test_cli_plot_writes_png(files):
    pytest.importorskip("matplotlib")
    tmp, val, _ = files
    png = tmp / "sweep.png"
    result = invoke(val, *SMALL, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = tmp / "curves.PNG"  # the suffix in any case
    result = invoke(val, "--mode", "curves", "--folds", 3, "--plot", curves)
    assert result.exit_code == 0, result.output
    assert curves.read_bytes()[:4] == b"\x89PNG"
    # a name that promises another format is refused before the sweep runs
    result = invoke(val, *SMALL, "--plot", tmp / "curves.pdf")
    assert result.exit_code == 2 and "--plot must end with .png" in result.stderr
    assert not (tmp / "curves.pdf").exists()


def test_cli_plot_without_matplotlib_says_how_to_install(files, monkeypatch):
    tmp, val, _ = files
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = invoke(val, *SMALL, "--plot", tmp / "sweep.png")
    assert result.exit_code == 2
    assert "pip install 'cnnbal[plot]'" in result.output
    assert not (tmp / "sweep.png").exists()


def test_cli_progress_bar_path(files, monkeypatch):
    import cnnbal.cli_sweep as cli_sweep

    monkeypatch.setattr(cli_sweep, "show_progress", lambda: True)
    _, val, _ = files
    assert sweep_json(val, *SMALL, "--folds", 2)["sweep"]["n_folds"] == 2


def test_cli_through_a_real_subprocess(files):
    import subprocess
    import sys

    from cnnbal import cli

    if "sweep" not in {c.name for c in cli.app.registered_commands}:
        pytest.skip("sweep is not registered in cnnbal.cli yet")
    _, val, _ = files
    done = subprocess.run(
        [sys.executable, "-m", "cnnbal", "sweep", str(val), *SMALL, "--folds", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sweep"]["n_configs"] == 16
