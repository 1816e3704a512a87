"""Reading every supported layout, and one clear error for every kind of bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cnnbal.errors import CnnbalError
from cnnbal.io import (
    ReadOptions,
    atomic_output,
    iter_chunks,
    read_class_names,
    read_outputs,
    softmax,
    validate_probs,
)
from tests.conftest import make_outputs, write_csv, write_parquet

NAMES = ["cat", "dog", "eel", "fox", "gnu", "hen"]


@pytest.mark.parametrize(
    ("score_key", "label_key"),
    [("probs", "labels"), ("predictions", "ground_truth"), ("probs", "targets")],
)
def test_npz_keys(tmp_path, outputs, score_key, label_key):
    probs, labels = outputs
    path = tmp_path / "val.npz"
    np.savez(path, **{score_key: probs, label_key: labels})
    out = read_outputs(path)
    np.testing.assert_array_equal(out.probs, probs)
    np.testing.assert_array_equal(out.labels, labels)
    assert out.class_names is None


def test_npz_logits_and_class_names(tmp_path, outputs):
    probs, labels = outputs
    logits = np.log(probs.astype(np.float64)) + 7.0  # any shift: softmax undoes it
    path = tmp_path / "val.npz"
    np.savez(path, logits=logits, labels=labels, class_names=np.array(NAMES))
    out = read_outputs(path)
    np.testing.assert_allclose(out.probs, probs, atol=1e-6)
    assert out.class_names == NAMES


def test_npy_with_labels_file(tmp_path, outputs):
    probs, labels = outputs
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "y.npy", labels)
    out = read_outputs(tmp_path / "p.npy", ReadOptions(labels_path=tmp_path / "y.npy"))
    np.testing.assert_array_equal(out.labels, labels)
    with pytest.raises(CnnbalError, match=r"p\.npy: no labels found \(pass --labels"):
        read_outputs(tmp_path / "p.npy")
    assert read_outputs(tmp_path / "p.npy", require_labels=False).labels is None


def test_npy_logits_flag(tmp_path):
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0], [1.0, 1.0]])  # large: stability
    np.save(tmp_path / "z.npy", logits)
    out = read_outputs(tmp_path / "z.npy", ReadOptions(logits=True), require_labels=False)
    np.testing.assert_allclose(out.probs, [[1, 0], [0, 1], [0.5, 0.5]])


@pytest.mark.parametrize("layout", ["list", "p_", "score_"])
def test_parquet_layouts(tmp_path, outputs, layout):
    probs, labels = outputs
    path = write_parquet(tmp_path / "v.parquet", probs, labels, layout=layout, class_names=NAMES)
    options = ReadOptions(prob_prefix="score_") if layout == "score_" else None
    out = read_outputs(path, options)
    np.testing.assert_array_equal(out.probs, probs)
    np.testing.assert_array_equal(out.labels, labels)
    assert out.class_names == NAMES


def test_parquet_string_labels_through_metadata_and_classes_file(tmp_path, outputs):
    probs, labels = outputs
    names = np.array(NAMES)[labels]
    path = write_parquet(tmp_path / "v.parquet", probs, names, class_names=NAMES)
    np.testing.assert_array_equal(read_outputs(path).labels, labels)
    bare = write_parquet(tmp_path / "bare.parquet", probs, names)
    with pytest.raises(CnnbalError, match="bare.parquet: labels are class names"):
        read_outputs(bare)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    np.testing.assert_array_equal(
        read_outputs(bare, ReadOptions(classes_path=classes)).labels, labels
    )
    names[3] = "yak"
    odd = write_parquet(tmp_path / "odd.parquet", probs, names, class_names=NAMES)
    with pytest.raises(CnnbalError, match="odd.parquet: unknown class name 'yak' at row 3"):
        read_outputs(odd)


def test_csv_prefix_columns(tmp_path, outputs):
    probs, labels = outputs
    path = write_csv(tmp_path / "v.csv", probs, labels)
    out = read_outputs(path)
    np.testing.assert_allclose(out.probs, probs, atol=1e-7)
    np.testing.assert_array_equal(out.labels, labels)


def test_logit_prefix_columns_are_softmaxed(tmp_path):
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    path = write_csv(tmp_path / "z.csv", logits, np.array([0, 1]), prefix="logit_")
    out = read_outputs(path)
    np.testing.assert_allclose(out.probs, softmax(logits.copy()))


def test_variable_list_column_accepted_when_rows_agree(tmp_path, outputs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    probs, labels = outputs
    table = pa.table({"label": labels, "probs": pa.array(probs.tolist())})
    pq.write_table(table, tmp_path / "v.parquet")
    np.testing.assert_allclose(read_outputs(tmp_path / "v.parquet").probs, probs)
    ragged = pa.table({"label": [0, 1], "probs": pa.array([[0.5, 0.5], [1.0]])})
    pq.write_table(ragged, tmp_path / "r.parquet")
    with pytest.raises(CnnbalError, match="r.parquet: column 'probs': rows have different"):
        read_outputs(tmp_path / "r.parquet")


def _npz(tmp_path, probs, labels=None, name="bad.npz"):
    path = tmp_path / name
    arrays = {"probs": probs}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], r"non-finite value nan at row 0, column 1"),
        (np.array([[0.5, 0.5], [np.inf, 0.0]]), [0, 1], r"non-finite value inf at row 1, column 0"),
        (np.array([[1.2, -0.2], [0.5, 0.5]]), [0, 1], r"negative probability -0.2 at row 0"),
        (np.array([[0.5, 0.6], [0.5, 0.5]]), [0, 1], r"row 0 sums to 1.1, not 1"),
        (np.array([0.5, 0.5]), [0], r"expected a 2-D array"),
        (np.zeros((0, 3)), [], r"no samples"),
        (np.ones((3, 1)), [0, 0, 0], r"need at least 2 classes"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 2], r"label 2 out of range for 2 classes"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, -1], r"label -1 out of range"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 1, 1], r"3 labels for 2 rows"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0.0, 0.5], r"labels must be integers"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), None, r"no labels found"),
    ],
)
def test_bad_arrays_name_file_and_problem(tmp_path, probs, labels, message):
    path = _npz(tmp_path, probs, None if labels is None else np.asarray(labels))
    with pytest.raises(CnnbalError, match=rf"^bad\.npz: .*{message}"):
        read_outputs(path)


def test_logits_hint_on_unnormalised_rows(tmp_path):
    path = _npz(tmp_path, np.array([[3.0, 1.0], [0.2, 0.1]]), np.array([0, 1]))
    with pytest.raises(CnnbalError, match="pass --logits"):
        read_outputs(path)
    out = read_outputs(path, ReadOptions(logits=True))
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0)


def test_float32_rounding_is_accepted(tmp_path):
    probs, labels = make_outputs(200, 1000, weak=range(100))
    assert np.abs(probs.sum(axis=1, dtype=np.float64) - 1).max() > 0  # rounding is there
    read_outputs(_npz(tmp_path, probs, labels))


def test_subnormals_are_flushed(tmp_path):
    probs = np.array([[1.0, 1e-41], [0.5, 0.5]], dtype=np.float32)
    out = validate_probs(probs, "x.npy")
    assert out[0, 1] == 0.0
    assert probs[0, 1] != 0.0  # the input array is not modified


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, probs=np.array([{"a": 1}, None], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(CnnbalError, match="evil.npz: .*refusing to unpickle"):
        read_outputs(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.npz", b"not a zip at all", "not a readable .npz"),
        ("junk.npy", b"\x93NUMPY garbage", "junk.npy"),
        ("junk.parquet", b"PAR1 nonsense", "not a readable parquet"),
        ("data.txt", b"1,2", "unsupported file type"),
    ],
)
def test_corrupt_and_foreign_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CnnbalError, match=message):
        read_outputs(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CnnbalError, match="no such file"):
        read_outputs(tmp_path / "nope.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(CnnbalError, match="is a directory"):
        read_outputs(tmp_path / "d.npz")


def test_table_without_scores(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": [0, 1], "x": [1.0, 2.0]}), tmp_path / "t.parquet")
    with pytest.raises(CnnbalError, match="t.parquet: no scores found"):
        read_outputs(tmp_path / "t.parquet")
    with pytest.raises(CnnbalError, match="no columns 'q_0'"):
        read_outputs(tmp_path / "t.parquet", ReadOptions(prob_prefix="q_"))


def test_class_names_count_must_match(tmp_path, outputs):
    probs, labels = outputs
    path = write_parquet(tmp_path / "v.parquet", probs, labels, class_names=NAMES[:4])
    with pytest.raises(CnnbalError, match="4 class names for 6 score columns"):
        read_outputs(path)


def test_read_class_names_errors(tmp_path):
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(CnnbalError, match="duplicate"):
        read_class_names(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CnnbalError, match="empty"):
        read_class_names(tmp_path / "empty.txt")


def test_iter_chunks_reports_the_failing_row_of_a_later_block(tmp_path):
    probs, labels = make_outputs(300, 4)
    probs[250, 1] = np.nan
    path = write_parquet(tmp_path / "v.parquet", probs, labels, row_group_size=100)
    source = iter_chunks(path, chunk_rows=100)
    assert source.n_rows == 300 and source.kind == "table"
    with pytest.raises(CnnbalError, match="v.parquet: non-finite value nan at row 250"):
        for _ in source.chunks:
            pass


def test_iter_chunks_covers_every_row_once(tmp_path):
    probs, _ = make_outputs(1000, 5)
    np.save(tmp_path / "p.npy", probs)
    source = iter_chunks(tmp_path / "p.npy", chunk_rows=300)
    blocks = list(source.chunks)
    assert [b.row_offset for b in blocks] == [0, 300, 600, 900]
    np.testing.assert_array_equal(np.concatenate([b.probs for b in blocks]), probs)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_refuses_the_input(tmp_path):
    src = tmp_path / "in.npz"
    src.write_bytes(b"x")
    with pytest.raises(CnnbalError, match="refusing to overwrite the input"):
        with atomic_output(tmp_path / "." / "in.npz", src):
            pass
    assert src.read_bytes() == b"x"


def test_schema_metadata_must_be_a_json_list(tmp_path, outputs):
    import pyarrow.parquet as pq

    probs, labels = outputs
    path = write_parquet(tmp_path / "v.parquet", probs, labels)
    table = pq.read_table(path).replace_schema_metadata({b"cnnbal.class_names": b"{oops"})
    pq.write_table(table, path)
    with pytest.raises(CnnbalError, match="not JSON"):
        read_outputs(path)
    table = table.replace_schema_metadata({b"cnnbal.class_names": json.dumps({"a": 1})})
    pq.write_table(table, path)
    with pytest.raises(CnnbalError, match="not a list of strings"):
        read_outputs(path)


def test_header_only_csv_has_no_samples(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("label,p_0,p_1\n")
    with pytest.raises(CnnbalError, match=r"^empty\.csv: no samples \(0 rows\)$"):
        read_outputs(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # +inf is seen by the row sums, and still wins over a negative value elsewhere
        ([[0.5, 0.5], [0.2, np.inf], [-0.1, 1.1]], "non-finite value inf at row 1, column 1"),
        ([[-0.1, 1.1], [0.2, np.inf]], "non-finite value inf at row 1, column 1"),
        ([[np.inf, -np.inf], [0.5, 0.5]], "non-finite value inf at row 0, column 0"),
        ([[0.5, 0.5], [np.nan, np.inf]], "non-finite value nan at row 1, column 0"),
        # finite float32 values whose sum overflows: a row-sum error, not a crash
        ([[0.5, 0.5], [3e38, 3e38]], "row 1 sums to inf, not 1"),
    ],
)
def test_non_finite_values_are_named_before_other_errors(values, message):
    from cnnbal.io.validation import check_probs

    arr = np.array(values, dtype=np.float32)
    for layout in (arr, np.asfortranarray(arr)):
        with pytest.raises(CnnbalError, match=re.escape(f"x.npy: {message}")):
            check_probs(layout, "x.npy")
