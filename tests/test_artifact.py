"""The H artifact: round trip, plain-numpy readability, and refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnbal import __version__
from cnnbal.artifact import FORMAT_VERSION, Artifact, load_artifact, save_artifact
from cnnbal.core import FitParams, fit_elaborated, fit_naive
from cnnbal.errors import CnnbalError
from tests.conftest import make_outputs


@pytest.fixture
def artifact():
    probs, labels = make_outputs(500, 5)
    result = fit_elaborated(probs, labels, FitParams(r_low=0.05, alpha=2.0))
    return Artifact.from_fit(
        result,
        class_names=list("abcde"),
        input_sha256="f" * 64,
        input_name="val.npz",
        provenance={"sweep": {"objective": "worst20"}},
    )


def test_round_trip(tmp_path, artifact):
    path = save_artifact(tmp_path / "H.npz", artifact)
    loaded = load_artifact(path)
    np.testing.assert_array_equal(loaded.H, artifact.H)
    assert loaded.method == "elaborated"
    assert loaded.params == {"r_low": 0.05, "r_high": 0.8, "beta": 1.5, "alpha": 2.0}
    assert loaded.fit_params == FitParams(r_low=0.05, alpha=2.0)
    assert loaded.apply_gate == 0.8
    assert loaded.class_names == list("abcde")
    np.testing.assert_array_equal(loaded.val_class_accuracy, artifact.val_class_accuracy)
    np.testing.assert_array_equal(loaded.val_class_counts, artifact.val_class_counts)
    assert loaded.n_val == 500 and loaded.n_competitive == artifact.n_competitive
    assert loaded.input_sha256 == "f" * 64 and loaded.input_name == "val.npz"
    assert loaded.cnnbal_version == __version__ and loaded.format_version == FORMAT_VERSION
    assert loaded.provenance == {"sweep": {"objective": "worst20"}}


def test_plain_numpy_reads_it_without_pickle(tmp_path, artifact):
    save_artifact(tmp_path / "H.npz", artifact)
    with np.load(tmp_path / "H.npz", allow_pickle=False) as data:
        assert data["H"].shape == (5, 6) and data["H"].dtype == np.float64
        assert str(data["method"]) == "elaborated"
        assert json.loads(str(data["params"]))["alpha"] == 2.0
        assert int(data["n_classes"]) == 5
        assert data["class_names"].tolist() == list("abcde")


def test_naive_artifact_has_infinite_gate(tmp_path):
    probs, labels = make_outputs(300, 4)
    art = Artifact.from_fit(fit_naive(probs, labels))
    loaded = load_artifact(save_artifact(tmp_path / "H.npz", art))
    assert loaded.method == "naive" and np.isinf(loaded.apply_gate)
    assert loaded.fit_params is None and loaded.class_names is None


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": np.array(FORMAT_VERSION + 1)}, "newer than this cnnbal"),
        ({"format": np.array("something-else")}, "not a cnnbal H artifact"),
        ({"format": None}, "not a cnnbal H artifact"),
        ({"H": np.zeros((5, 5))}, r"H has shape \(5, 5\), expected \(5, 6\)"),
        ({"H": np.full((5, 6), np.nan)}, "H holds NaN or inf"),
        ({"method": None}, "missing method"),
        ({"class_names": np.array(["a"])}, "class_names has shape"),
        ({"params": np.array("{nope")}, "params are not JSON"),
    ],
)
def test_bad_artifacts(tmp_path, artifact, changes, message):
    path = save_artifact(tmp_path / "H.npz", artifact)
    _rewrite(path, **changes)
    with pytest.raises(CnnbalError, match=f"H.npz: .*{message}"):
        load_artifact(path)


def test_foreign_and_corrupt_files(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(CnnbalError, match="other.npz: not a cnnbal H artifact"):
        load_artifact(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(CnnbalError, match="junk.npz: not a cnnbal H artifact"):
        load_artifact(tmp_path / "junk.npz")
    np.save(tmp_path / "plain.npy", np.ones(3))
    with pytest.raises(CnnbalError, match="plain.npy: not a cnnbal H artifact"):
        load_artifact(tmp_path / "plain.npy")
    with pytest.raises(CnnbalError, match="no such file"):
        load_artifact(tmp_path / "missing.npz")
    # a parquet (or any non-zip) file passed as H: says what it is not, no numpy jargon
    (tmp_path / "val.parquet").write_bytes(b"PAR1" + bytes(64))
    with pytest.raises(CnnbalError, match=r"^val\.parquet: not a cnnbal H artifact \(not an \.npz"):
        load_artifact(tmp_path / "val.parquet")


def test_truncated_artifact(tmp_path, artifact):
    path = save_artifact(tmp_path / "H.npz", artifact)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a zip cut short: a copy interrupted
    with pytest.raises(CnnbalError, match="H.npz: not a readable H artifact"):
        load_artifact(path)


def test_save_is_atomic(tmp_path, artifact, monkeypatch):
    target = tmp_path / "H.npz"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(target, artifact)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["H.npz"]
