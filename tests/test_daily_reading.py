"""Files as other tools write them: rounded exports, other column names, other delimiters,
string labels named by H, and outputs that keep what the input had (issue 10, items 1-3)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cnnbal.artifact import load_artifact
from cnnbal.cli import app
from cnnbal.core import apply_correction, fit_elaborated
from cnnbal.errors import CnnbalError
from cnnbal.io import ReadOptions, iter_chunks, read_outputs
from tests.conftest import make_outputs, write_csv, write_parquet


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _hundred_class_outputs(n_samples=6000, seed=3):
    """Softmax outputs of a decent K = 100 classifier (20 weak classes), float64.

    Rows whose true-class or top probability lies within 1e-3 of the fit's
    thresholds (0.1, 0.8) are dropped: rounding to 4 decimals may move such a
    row across a threshold, which changes the competitive set, a jump of the
    method itself and not an error of reading.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 100, n_samples)
    logits = rng.normal(0.0, 1.5, (n_samples, 100))
    boost = np.full(100, 6.0)
    boost[:20] = 4.0
    logits[np.arange(n_samples), labels] += boost[labels]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    true = probs[np.arange(n_samples), labels]
    top = probs.max(axis=1)
    keep = (np.abs(true - 0.1) > 1e-3) & (np.abs(top - 0.8) > 1e-3)
    return probs[keep], labels[keep]


def _write_rounded_csv(path, probs, labels, fmt="%.4f", delimiter=","):
    header = delimiter.join(["label"] + [f"p_{j}" for j in range(probs.shape[1])])
    np.savetxt(
        path,
        np.column_stack([labels, probs]),
        fmt=["%d"] + [fmt] * probs.shape[1],
        delimiter=delimiter,
        header=header,
        comments="",
    )
    return path


# ---------------------------------------------------------------- 1. --renormalize


def test_rounded_k100_csv_fits_with_renormalize_to_the_exact_h(tmp_path):
    """Must show: a K = 100 CSV written with %.4f gives the exact probabilities' H to 1e-3."""
    probs, labels = _hundred_class_outputs()
    csv = _write_rounded_csv(tmp_path / "val.csv", probs, labels)
    np.savez(tmp_path / "exact.npz", probs=probs, labels=labels)

    refused = run("fit", "--force", csv, "-o", tmp_path / "H_rounded.npz")
    assert refused.exit_code == 2
    message = refused.stderr.strip()
    # the sum with enough digits to be visibly outside the tolerance, the row in the
    # file (and its CSV line), the count, and the hint for a rounded export
    assert message.startswith("error: val.csv: row ")
    assert "(line " in message and "tolerance 0.001" in message
    assert "pass --renormalize" in message and "--logits" not in message
    assert "this block" not in message
    row = int(message.split("row ")[1].split(" ")[0])
    printed = float(message.split("sums to ")[1].split(",")[0])
    assert abs(printed - 1) > 1e-3
    rounded = np.loadtxt(csv, delimiter=",", skiprows=1)[:, 1:]
    assert printed == pytest.approx(rounded[row].sum(), abs=1e-12)
    assert not (tmp_path / "H_rounded.npz").exists()

    fitted = run("fit", "--force", csv, "-o", tmp_path / "H_rounded.npz", "--renormalize", "--json")
    assert fitted.exit_code == 0, fitted.output
    # a row summing to exactly 0.999 in decimal is inside the tolerance
    n_off = int(np.sum(np.abs(rounded.sum(axis=1) - 1) > 1e-3 * (1 + 1e-9)))
    assert n_off > 0
    assert json.loads(fitted.stdout)["rows_renormalized"] == n_off
    assert f"renormalized {n_off} row(s)" in fitted.stderr
    exact = run("fit", "--force", tmp_path / "exact.npz", "-o", tmp_path / "H_exact.npz")
    assert exact.exit_code == 0
    h_rounded = load_artifact(tmp_path / "H_rounded.npz").H
    h_exact = load_artifact(tmp_path / "H_exact.npz").H
    assert np.abs(h_rounded - h_exact).max() < 1e-3
    # and H is far from the identity, so agreeing to 1e-3 says something
    assert np.abs(h_exact[:, :-1] - np.eye(100)).max() > 0.5


def test_renormalize_divides_only_the_rows_off_by_more_than_the_tolerance(tmp_path):
    probs = np.array([[0.5, 0.499], [0.3, 0.6995], [0.2, 0.7]])  # sums 0.999, 0.9995, 0.9
    outputs = read_outputs(_npz(tmp_path, probs, [0, 1, 1]), ReadOptions(renormalize=True))
    assert outputs.n_renormalized == 1  # 0.9; 0.999 and 0.9995 are inside 1e-3
    np.testing.assert_allclose(outputs.probs[2], [2 / 9, 7 / 9])
    np.testing.assert_array_equal(outputs.probs[:2], probs[:2])


def test_row_sum_hint_fits_the_case_and_zero_rows_stay_refused(tmp_path):
    far = _npz(tmp_path, np.array([[2.0, 3.0], [0.5, 0.5]]), [0, 1])
    with pytest.raises(CnnbalError, match=r"row 0 sums to 5, not 1 .*pass --logits\)$"):
        read_outputs(far)
    zero = _npz(tmp_path, np.array([[0.5, 0.5], [0.0, 0.0]]), [0, 1])
    with pytest.raises(CnnbalError, match=r"row 1 sums to 0, .*row of zeros cannot be"):
        read_outputs(zero, ReadOptions(renormalize=True))


def test_row_numbers_are_rows_of_the_file_when_streaming(tmp_path):
    probs, labels = make_outputs(300, 4, seed=2)
    probs = probs.astype(np.float64)
    probs[250] *= 0.99
    np.save(tmp_path / "in.npy", probs)
    source = iter_chunks(tmp_path / "in.npy", chunk_rows=100)
    with pytest.raises(CnnbalError, match=r"^in\.npy: row 250 sums to 0\.99, .*rows 200\.\.299"):
        list(source.chunks)
    fixed = iter_chunks(tmp_path / "in.npy", ReadOptions(renormalize=True), chunk_rows=100)
    assert sum(chunk.n_renormalized for chunk in fixed.chunks) == 1
    csv = write_csv(tmp_path / "in.csv", probs, labels)  # a CSV also names its line
    with pytest.raises(CnnbalError, match=r"^in\.csv: row 250 \(line 252\) sums to 0\.99,"):
        read_outputs(csv)


def test_apply_and_evaluate_renormalize_and_count_on_stderr(tmp_path):
    probs, labels = make_outputs(400, 5, seed=4)
    rounded = np.round(probs.astype(np.float64), 2)
    csv = _write_rounded_csv(tmp_path / "test.csv", rounded, labels, fmt="%.2f")
    n_off = int(np.sum(np.abs(rounded.sum(axis=1) - 1) > 1e-3))
    assert n_off > 0
    val = write_parquet(tmp_path / "val.parquet", probs, labels)
    assert run("fit", "--force", val, "-o", tmp_path / "H.npz").exit_code == 0
    applied = run("apply", tmp_path / "H.npz", csv, "-o", tmp_path / "out.csv", "--renormalize")
    assert applied.exit_code == 0, applied.output
    assert f"renormalized {n_off} row(s)" in applied.stderr
    evaluated = run("evaluate", csv, "-H", tmp_path / "H.npz", "--renormalize", "--json")
    assert json.loads(evaluated.stdout)["rows_renormalized"] == n_off


# ---------------------------------------------------------------- 2. columns, delimiters


def _target_scores_parquet(path, probs, labels, names=None):
    columns = {
        "id": pa.array(np.arange(len(labels))),
        "target": pa.array(labels if names is None else [names[k] for k in labels]),
        "scores": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(probs).reshape(-1)), probs.shape[1]
        ),
    }
    pq.write_table(pa.table(columns), path)
    return path


def test_target_and_scores_columns_run_through_fit_apply_evaluate(tmp_path):
    """Must show: a parquet with `target` and `scores` columns, with the two flags."""
    probs, labels = make_outputs(1000, 6, seed=8)
    val = _target_scores_parquet(tmp_path / "val.parquet", probs[:500], labels[:500])
    test = _target_scores_parquet(tmp_path / "test.parquet", probs[500:], labels[500:])
    flags = ["--label-column", "target", "--score-column", "scores"]

    without = run("fit", "--force", val, "-o", tmp_path / "H.npz")
    assert without.exit_code == 2
    assert "--score-column NAME" in without.stderr and "target, scores" in without.stderr

    assert run("fit", "--force", val, "-o", tmp_path / "H.npz", *flags).exit_code == 0
    expected_h = fit_elaborated(probs[:500], labels[:500]).H
    np.testing.assert_allclose(load_artifact(tmp_path / "H.npz").H, expected_h, atol=1e-10)

    evaluated = run("evaluate", test, "-H", tmp_path / "H.npz", *flags, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    corrected = apply_correction(expected_h, probs[500:], 0.8)
    accuracy = float(np.mean(corrected.argmax(axis=1) == labels[500:]))
    total = json.loads(evaluated.stdout)["metrics"]["total_accuracy"]
    assert total["corrected"] == pytest.approx(accuracy)

    applied = run("apply", tmp_path / "H.npz", test, "-o", tmp_path / "out.parquet", *flags)
    assert applied.exit_code == 0, applied.output
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "target", "pred", "probs"]
    np.testing.assert_array_equal(table.column("target").to_numpy(), labels[500:])
    np.testing.assert_array_equal(table.column("pred").to_numpy(), corrected.argmax(axis=1))


def test_score_column_as_a_prefix_and_npz_keys(tmp_path):
    probs, labels = make_outputs(300, 4, seed=9)
    table = {"y": pa.array(labels)}
    table.update({f"prob_{j}": pa.array(probs[:, j]) for j in range(4)})
    pq.write_table(pa.table(table), tmp_path / "wide.parquet")
    wide = read_outputs(
        tmp_path / "wide.parquet", ReadOptions(label_column="y", score_column="prob_")
    )
    np.testing.assert_array_equal(wide.probs, probs)
    np.testing.assert_array_equal(wide.labels, labels)

    np.savez(tmp_path / "keys.npz", softmax=probs, y_true=labels)
    keyed = read_outputs(
        tmp_path / "keys.npz", ReadOptions(label_column="y_true", score_column="softmax")
    )
    np.testing.assert_array_equal(keyed.labels, labels)
    with pytest.raises(CnnbalError, match=r"no array 'target' \(from --label-column; found"):
        read_outputs(
            tmp_path / "keys.npz", ReadOptions(label_column="target", score_column="softmax")
        )
    with pytest.raises(CnnbalError, match=r"no column 'target' \(from --label-column; columns"):
        read_outputs(tmp_path / "wide.parquet", ReadOptions(label_column="target"))


@pytest.mark.parametrize(("delimiter", "flag"), [(";", None), ("\t", None), ("|", "|")])
def test_csv_delimiter_is_detected_or_given(tmp_path, delimiter, flag):
    probs, labels = make_outputs(200, 3, seed=10)
    path = _write_rounded_csv(tmp_path / "semi.csv", probs, labels, "%.9f", delimiter)
    options = ReadOptions(delimiter=flag)
    outputs = read_outputs(path, options)
    np.testing.assert_allclose(outputs.probs, probs, atol=1e-8)
    assert run("evaluate", path).exit_code == 0
    streamed = iter_chunks(path, options)
    np.testing.assert_allclose(next(streamed.chunks).probs, probs, atol=1e-8)


def test_wrong_delimiter_names_the_flag(tmp_path):
    probs, labels = make_outputs(50, 3, seed=10)
    path = _write_rounded_csv(tmp_path / "semi.csv", probs, labels, "%.9f", ";")
    result = run("evaluate", path, "--delimiter", ",")
    assert result.exit_code == 2
    assert "another delimiter? (--delimiter)" in result.stderr
    assert run("evaluate", path, "--delimiter", "tab").exit_code == 2
    assert "one character" in run("evaluate", path, "--delimiter", ";;").stderr


def test_csv_output_is_unquoted_and_float32_shortest(tmp_path):
    probs, labels = make_outputs(500, 4, seed=12)
    names = ["cat", "dog", "a, b", 'say "hi"']
    val = write_parquet(tmp_path / "val.parquet", probs, labels, class_names=names)
    csv = write_csv(tmp_path / "test.csv", probs, labels)  # float64 values, 17 digits
    assert run("fit", "--force", val, "-o", tmp_path / "H.npz").exit_code == 0
    assert run("apply", tmp_path / "H.npz", csv, "-o", tmp_path / "out.csv").exit_code == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "label,pred,pred_name,p_0,p_1,p_2,p_3"
    first = lines[1].split(",")
    assert first[0] == str(labels[0]) and first[1].isdigit()  # numbers never quoted
    for value in first[-4:]:  # float32 in its shortest form, not float64's 17 digits
        assert len(value) <= len(str(np.float32(value))) <= 14
    assert any('"a, b"' in line for line in lines)  # a name with a comma: quoted, only it
    assert any('"say ""hi"""' in line for line in lines)
    assert (tmp_path / "out.csv").stat().st_size < 0.75 * csv.stat().st_size


def test_npz_output_keeps_the_inputs_other_arrays(tmp_path):
    probs, labels = make_outputs(300, 4, seed=13)
    ids = np.arange(1000, 1300)
    np.savez(tmp_path / "test.npz", probs=probs, labels=labels, ids=ids, split=np.array("test"))
    np.savez(tmp_path / "val.npz", probs=probs, labels=labels)
    assert run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz").exit_code == 0
    result = run("apply", tmp_path / "H.npz", tmp_path / "test.npz", "-o", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "o.npz", allow_pickle=False) as out:
        # cnnbal_h_sha256: the record of the H applied (apply on datasets skips on re-runs)
        assert set(out.files) == {"probs", "pred", "labels", "ids", "split", "cnnbal_h_sha256"}
        np.testing.assert_array_equal(out["ids"], ids)
        assert str(out["split"]) == "test"


# ---------------------------------------------------------------- 3. class names from H


def test_string_labels_are_read_through_the_names_in_h(tmp_path):
    probs, labels = make_outputs(800, 3, seed=14)
    names = ["cat", "dog", "emu"]
    val = write_parquet(tmp_path / "val.parquet", probs[:400], labels[:400], class_names=names)
    test = tmp_path / "test_names.parquet"
    pq.write_table(
        pa.table(
            {
                "label": pa.array([names[k] for k in labels[400:]]),
                "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs[400:].reshape(-1)), 3),
            }
        ),
        test,
    )
    assert run("fit", "--force", val, "-o", tmp_path / "H.npz").exit_code == 0
    no_names = run("evaluate", test)
    assert no_names.exit_code == 2 and "-H with an H that stores names" in no_names.stderr

    evaluated = run("evaluate", test, "-H", tmp_path / "H.npz", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    payload = json.loads(evaluated.stdout)
    assert [c["name"] for c in payload["per_class"]] == names
    raw = float(np.mean(probs[400:].argmax(axis=1) == labels[400:]))
    assert payload["metrics"]["total_accuracy"]["raw"] == pytest.approx(raw)

    applied = run("apply", tmp_path / "H.npz", test, "-o", tmp_path / "out.parquet")
    assert applied.exit_code == 0, applied.output
    out = pq.read_table(tmp_path / "out.parquet")
    pred = out.column("pred").to_numpy()
    assert out.column("pred_name").to_pylist() == [names[k] for k in pred]
    assert out.column("label").to_pylist()[:3] == [names[k] for k in labels[400:403]]


def test_npz_string_labels_and_pred_name_via_h(tmp_path):
    probs, labels = make_outputs(400, 3, seed=15)
    names = np.array(["cat", "dog", "emu"])
    np.savez(tmp_path / "val.npz", probs=probs, labels=labels, class_names=names)
    np.savez(tmp_path / "test.npz", probs=probs, labels=names[labels])
    assert run("fit", "--force", tmp_path / "val.npz", "-o", tmp_path / "H.npz").exit_code == 0
    result = run("apply", tmp_path / "H.npz", tmp_path / "test.npz", "-o", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "o.npz", allow_pickle=False) as out:
        np.testing.assert_array_equal(out["labels"], labels)
        np.testing.assert_array_equal(out["pred_name"], names[out["pred"]])


def _npz(tmp_path, probs, labels):
    path = tmp_path / "in.npz"
    np.savez(path, probs=np.asarray(probs), labels=np.asarray(labels))
    return path
