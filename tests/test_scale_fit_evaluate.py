"""fit_dataset / evaluate_dataset: streaming over shards gives the in-memory answer."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbal.artifact import load_artifact
from cnnbal.errors import CnnbalError
from cnnbal.io import ReadOptions, file_sha256, open_dataset
from cnnbal.metrics import METRIC_NAMES
from cnnbal.pipeline import evaluate_dataset, evaluate_file, fit_dataset, fit_file
from tests.conftest import make_outputs, write_csv, write_parquet

N_ROWS, N_CLASSES = 3_000, 10


@pytest.fixture(scope="module")
def data():
    return make_outputs(N_ROWS, N_CLASSES, seed=21, weak=(0, 1, 2))


def write_shards(folder, probs, labels, kind, n_shards=3):
    folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), n_shards)):
        path = folder / f"part-{i}.{kind}"
        if kind == "parquet":
            # small row groups: several record batches per shard
            write_parquet(path, probs[rows], labels[rows], layout="p_", row_group_size=300)
        elif kind == "csv":
            write_csv(path, probs[rows], labels[rows])
        else:
            np.savez(path, probs=probs[rows], labels=labels[rows])
    return folder


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    probs, labels = data
    path = tmp_path_factory.mktemp("whole") / "all.npz"
    np.savez(path, probs=probs, labels=labels)
    return path


@pytest.fixture(scope="module", params=["parquet", "npz", "csv"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def shards(kind, tmp_path_factory, data):
    probs, labels = data
    return write_shards(tmp_path_factory.mktemp("ds") / "shards", probs, labels, kind)


@pytest.fixture(scope="module")
def single(kind, tmp_path_factory, data):
    """The same rows as one file of the same format (CSV holds float64, the others float32)."""
    probs, labels = data
    folder = write_shards(tmp_path_factory.mktemp("one") / "one", probs, labels, kind, n_shards=1)
    return next(folder.iterdir())


@pytest.mark.parametrize("method", ["elaborated", "naive"])
def test_fit_on_shards_equals_fit_on_the_concatenation(shards, whole, method):
    expected = fit_file(whole, method=method)
    artifact, notes = fit_dataset(shards, method=method, chunk_rows=400)
    np.testing.assert_allclose(artifact.H, expected.H, rtol=0, atol=1e-10)
    assert artifact.n_val == N_ROWS
    assert artifact.n_competitive == expected.n_competitive
    np.testing.assert_array_equal(artifact.val_class_counts, expected.val_class_counts)
    np.testing.assert_array_equal(artifact.val_class_accuracy, expected.val_class_accuracy)
    assert artifact.method == method
    assert isinstance(notes, tuple)


def test_evaluate_on_shards_equals_evaluate_on_the_concatenation(shards, single, tmp_path):
    h_path = tmp_path / "H.npz"
    fit_file(single, h_path)
    _, _, expected = evaluate_file(single, h_path)
    result = evaluate_dataset(shards, load_artifact(h_path), chunk_rows=700)
    for name in METRIC_NAMES:
        assert result.metrics[name] == expected.metrics[name], name
    assert result.changed == expected.changed
    np.testing.assert_array_equal(result.low20_classes, expected.low20_classes)
    np.testing.assert_array_equal(result.low20_val_classes, expected.low20_val_classes)
    assert result.n_samples == N_ROWS


def test_raw_only_evaluation_of_shards(shards, single):
    _, _, expected = evaluate_file(single)
    result = evaluate_dataset(shards)
    for name in METRIC_NAMES:
        raw, new = result.metrics[name]
        assert raw == expected.metrics[name][0] or raw != raw, name
        assert new == raw or raw != raw


def test_npy_is_streamed_in_chunks_with_the_same_results(tmp_path, data, whole):
    probs, labels = data
    np.save(tmp_path / "val.npy", probs)
    np.save(tmp_path / "labels.npy", labels)
    options = ReadOptions(labels_path=tmp_path / "labels.npy")
    expected = fit_file(whole)
    artifact, _ = fit_dataset(tmp_path / "val.npy", options=options, chunk_rows=256)
    np.testing.assert_allclose(artifact.H, expected.H, rtol=0, atol=1e-10)
    # one file: the artifact records that file's SHA-256, as fit_file does
    assert artifact.input_sha256 == file_sha256(tmp_path / "val.npy")
    _, _, expected_cmp = evaluate_file(whole, _save(tmp_path, expected))
    result = evaluate_dataset(tmp_path / "val.npy", expected, options=options, chunk_rows=256)
    assert result.metrics == expected_cmp.metrics


def _save(tmp_path, artifact):
    from cnnbal.artifact import save_artifact

    path = tmp_path / "H_expected.npz"
    save_artifact(path, artifact)
    return path


def test_artifact_names_the_dataset_and_hashes_every_shard(tmp_path, data):
    probs, labels = data
    folder = write_shards(tmp_path / "shards", probs, labels, "npz")
    artifact, _ = fit_dataset(folder)
    dataset = open_dataset(folder, require_labels=True)
    assert artifact.input_name == dataset.label
    first = fit_dataset(folder)[0].input_sha256
    assert artifact.input_sha256 == first and len(first) == 64
    # any shard's bytes change the recorded hash
    np.savez(folder / "part-2.npz", probs=probs[:10], labels=labels[:10])
    assert fit_dataset(folder)[0].input_sha256 != first


def test_fewer_rows_than_classes_is_fitted_in_memory_with_the_same_result(tmp_path):
    probs, labels = make_outputs(40, 60, seed=22)
    folder = write_shards(tmp_path / "wide", probs, labels, "npz", n_shards=2)
    np.savez(tmp_path / "all.npz", probs=probs, labels=labels)
    for method in ("elaborated", "naive"):
        expected = fit_file(tmp_path / "all.npz", method=method)
        artifact, _ = fit_dataset(folder, method=method)
        np.testing.assert_allclose(artifact.H, expected.H, rtol=0, atol=1e-10)


def test_shards_without_labels_are_refused(tmp_path, data):
    probs, _ = data
    folder = tmp_path / "nolabels"
    folder.mkdir()
    np.savez(folder / "a.npz", probs=probs[:100])
    with pytest.raises(CnnbalError, match="no labels"):
        fit_dataset(folder)
    with pytest.raises(CnnbalError, match="no labels"):
        evaluate_dataset(folder)


def test_evaluate_refuses_an_h_of_another_class_count(tmp_path, shards):
    probs, labels = make_outputs(200, 4, seed=23)
    np.savez(tmp_path / "other.npz", probs=probs, labels=labels)
    artifact = fit_file(tmp_path / "other.npz")
    with pytest.raises(CnnbalError, match="10 classes, but H.npz was fitted for 4"):
        evaluate_dataset(shards, artifact, h_name="H.npz")


def test_bad_method_and_params_are_refused_before_reading(tmp_path):
    with pytest.raises(CnnbalError, match="--method"):
        fit_dataset(tmp_path / "missing", method="magic")
    from cnnbal.core import FitParams

    with pytest.raises(CnnbalError, match="--r-low"):
        fit_dataset(tmp_path / "missing", params=FitParams(r_low=0.9, r_high=0.5))


def test_local_engine_with_two_processes_gives_the_in_process_results(tmp_path, data):
    from cnnbal.engine import make_engine

    probs, labels = data
    folder = write_shards(tmp_path / "shards", probs, labels, "parquet", n_shards=4)
    expected, _ = fit_dataset(folder)
    expected_cmp = evaluate_dataset(folder, expected)
    with make_engine("local", jobs=2) as engine:
        artifact, _ = fit_dataset(folder, engine=engine)
        comparison = evaluate_dataset(folder, artifact, engine=engine)
    np.testing.assert_allclose(artifact.H, expected.H, rtol=0, atol=1e-12)
    assert comparison.metrics == expected_cmp.metrics


def test_rows_renormalized_are_counted_over_every_shard(tmp_path, data):
    # a rounded export: every 10th row is off 1 by 0.01, beyond the 1e-3 tolerance
    probs, labels = data
    rounded = probs.astype(np.float64)
    rounded[::10] *= 1.01
    folder = write_shards(tmp_path / "rounded", rounded, labels, "npz", n_shards=3)
    options = ReadOptions(renormalize=True)
    report: dict = {}
    artifact, _ = fit_dataset(folder, options=options, report=report)
    assert report == {"rows_renormalized": len(rounded[::10])}
    report = {}
    evaluate_dataset(folder, artifact, options=options, report=report)
    assert report == {"rows_renormalized": len(rounded[::10])}


def test_every_correction_kind_evaluates_streamed_as_in_memory(shards, single, tmp_path):
    import dataclasses

    from cnnbal.artifact import save_artifact
    from cnnbal.corrections import Correction

    affine = fit_file(single)
    for correction in (
        Correction.temperature(1.7),
        Correction.logit_bias(np.linspace(-0.5, 0.5, N_CLASSES), 1.2),
    ):
        artifact = dataclasses.replace(affine, correction=correction)
        path = tmp_path / f"{correction.kind}.npz"
        save_artifact(path, artifact)
        _, _, expected = evaluate_file(single, path)
        result = evaluate_dataset(shards, load_artifact(path), chunk_rows=700)
        assert result.metrics == expected.metrics, correction.kind
        assert result.changed == expected.changed


def test_reading_ahead_or_in_turn_gives_the_same_statistics(shards, tmp_path, monkeypatch):
    """With 2+ cores a reader thread decodes the next blocks; with one core's share
    (a worker process) blocks are read in turn: the sums must not notice."""
    import cnnbal.engine

    artifact, _ = fit_dataset(shards, chunk_rows=400)
    threaded = evaluate_dataset(shards, artifact, chunk_rows=700)
    monkeypatch.setattr(cnnbal.engine, "_worker_cores", 1)
    inline_fit, _ = fit_dataset(shards, chunk_rows=400)
    inline = evaluate_dataset(shards, artifact, chunk_rows=700)
    np.testing.assert_array_equal(inline_fit.H, artifact.H)
    for name in METRIC_NAMES:
        np.testing.assert_equal(inline.metrics[name], threaded.metrics[name])  # NaN == NaN
    assert inline.changed == threaded.changed


def test_a_bad_block_read_ahead_is_reported_with_its_shard(tmp_path, data):
    probs, labels = data
    probs = probs.copy()
    probs[1700, 3] = np.nan  # shard 1 of 3, its fourth block of 300 rows
    folder = write_shards(tmp_path / "bad", probs, labels, "parquet")
    with pytest.raises(CnnbalError, match=r"part-1.parquet: non-finite value nan at row 700"):
        evaluate_dataset(folder, chunk_rows=300)
