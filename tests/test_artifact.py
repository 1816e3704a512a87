"""The correction artifact: round trip of every kind, plain-numpy readability, version-1
files, and refusal of bad or hostile files (one line naming the file, never a traceback,
never a silently wrong correction)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnbal import __version__
from cnnbal import artifact as artifact_module
from cnnbal.artifact import FORMAT_VERSION, Artifact, load_artifact, save_artifact
from cnnbal.cli import app
from cnnbal.core import FitParams, apply_correction, fit_elaborated, fit_naive
from cnnbal.corrections import Correction
from cnnbal.errors import CnnbalError
from cnnbal.pipeline import correct
from tests.conftest import make_outputs

V1_FIXTURE = Path(__file__).parent / "data" / "h_v1_elaborated.npz"


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


def test_an_unreadable_artifact_says_permission_denied(tmp_path, artifact, monkeypatch):
    """As test_hostile.py's mode-000 case, also when run as root (modes do not stop root)."""
    save_artifact(tmp_path / "H.npz", artifact)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(artifact_module, "open", denied, raising=False)
    with pytest.raises(CnnbalError, match=r"H\.npz: permission denied$"):
        load_artifact(tmp_path / "H.npz")


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


# ---------------------------------------------------------------- every kind


def _kind_artifact(correction: Correction, k: int = 5) -> Artifact:
    return Artifact(
        correction=correction,
        method={"logit_bias": "class-dro", "temperature": "temperature"}.get(
            correction.kind, "vector-scaling"
        ),
        params={"eta": 0.1} if correction.kind == "logit_bias" else {},
        class_names=list("abcde")[:k],
        val_class_accuracy=np.linspace(0.2, 1.0, k),
        val_class_counts=np.full(k, 10),
        n_val=10 * k,
        provenance={"cv": {"chosen": 0.1}},
    )


KIND_EXAMPLES = {
    "logit_bias": Correction.logit_bias(np.array([0.5, -0.25, 0.0, 1.5, -2.0]), 1.25),
    "temperature": Correction.temperature(2.5),
    "vector_scaling": Correction.vector_scaling(np.linspace(0.5, 1.5, 5), np.arange(5.0) / 10),
}


@pytest.mark.parametrize("kind", sorted(KIND_EXAMPLES))
def test_every_kind_round_trips_and_reads_with_plain_numpy(tmp_path, kind):
    original = _kind_artifact(KIND_EXAMPLES[kind])
    path = save_artifact(tmp_path / "C.npz", original)
    loaded = load_artifact(path)
    assert loaded.kind == kind and loaded.format_version == FORMAT_VERSION == 2
    assert loaded.correction == original.correction
    assert loaded.method == original.method and loaded.params == original.params
    assert loaded.provenance == {"cv": {"chosen": 0.1}}
    assert np.isinf(loaded.apply_gate)
    with np.load(path, allow_pickle=False) as data:
        assert str(data["kind"]) == kind
        for name, value in original.correction.params.items():
            np.testing.assert_array_equal(data[name], value)
            assert data[name].dtype == np.float64
    with pytest.raises(CnnbalError, match=f"a {kind} correction has no H matrix"):
        _ = loaded.H


def test_plain_numpy_recipe_for_a_logit_bias(tmp_path):
    """The README's recipe: softmax((log p + bias) / T), with nothing but numpy."""
    probs, _ = make_outputs(50, 5)
    save_artifact(tmp_path / "C.npz", _kind_artifact(KIND_EXAMPLES["logit_bias"]))
    with np.load(tmp_path / "C.npz", allow_pickle=False) as a:
        bias, t = a["bias"], float(a["temperature"])
    z = (np.log(probs.astype(np.float64)) + bias) / t
    by_hand = np.exp(z - z.max(1, keepdims=True))
    by_hand /= by_hand.sum(1, keepdims=True)
    artifact = load_artifact(tmp_path / "C.npz")
    np.testing.assert_allclose(correct(artifact, probs), by_hand, rtol=1e-5, atol=1e-7)


def test_describe_reports_each_kind_in_its_own_terms():
    bias = _kind_artifact(KIND_EXAMPLES["logit_bias"]).describe()
    assert bias["kind"] == "logit_bias" and bias["temperature"] == 1.25
    assert (bias["bias_min"], bias["bias_max"], bias["bias_range"]) == (-2.0, 1.5, 3.5)
    assert bias["bias_lowest_class"] == "4 (e)" and bias["bias_highest_class"] == "3 (d)"
    assert "h_max_abs" not in bias and "apply_gate" not in bias
    assert _kind_artifact(KIND_EXAMPLES["temperature"]).describe()["temperature"] == 2.5
    scaling = _kind_artifact(KIND_EXAMPLES["vector_scaling"]).describe()
    assert (scaling["scale_min"], scaling["scale_max"]) == (0.5, 1.5)
    json.dumps(bias)  # JSON-ready


def test_artifact_members_match_what_corrections_write():
    """The loader's per-kind schema and Correction.to_arrays name the same arrays."""
    examples = {**KIND_EXAMPLES, "affine": Correction.affine(np.eye(5, 6), 0.8)}
    for kind, correction in examples.items():
        written = set(correction.to_arrays()) - {"kind"}
        assert written == set(artifact_module._KIND_MEMBERS[kind]), kind


def test_from_method_fit_keeps_hyper_parameters_and_the_cv_record():
    from cnnbal.methods import fit_method

    probs, labels = make_outputs(400, 5, seed=2)
    fitted = fit_method("logit-adjust", probs, labels, n_folds=3)
    art = Artifact.from_method_fit(fitted, class_names=list("abcde"), input_name="val.npz")
    assert art.kind == "logit_bias" and art.method == "logit-adjust"
    assert art.params == {"tau": fitted.hyper["tau"]}
    assert art.provenance["cv"]["chosen"] == fitted.hyper["tau"]
    np.testing.assert_array_equal(art.val_class_counts, np.bincount(labels, minlength=5))
    unlabelled = fit_method("prior-match", probs, unlabelled=True)
    art = Artifact.from_method_fit(unlabelled)
    assert np.isnan(art.val_class_accuracy).all() and art.n_classes == 5
    elaborated = Artifact.from_method_fit(fit_method("elaborated", probs, labels))
    assert elaborated.fit_params == FitParams() and elaborated.n_competitive > 0


# ---------------------------------------------------------------- version 1


def test_version_1_artifacts_still_load_as_affine():
    """tests/data/h_v1_elaborated.npz was written by cnnbal before format version 2."""
    with np.load(V1_FIXTURE, allow_pickle=False) as raw:
        assert int(raw["format_version"]) == 1 and "kind" not in raw.files
    loaded = load_artifact(V1_FIXTURE)
    assert loaded.format_version == 1 and loaded.kind == "affine"
    assert loaded.method == "elaborated" and loaded.apply_gate == 0.9
    assert loaded.class_names == ["ant", "bee", "cat", "dog"]
    probs, labels = make_outputs(300, 4, seed=3)
    refit = fit_elaborated(probs, labels, FitParams(r_low=0.05, r_high=0.9))
    np.testing.assert_allclose(loaded.H, refit.H, atol=1e-12)
    np.testing.assert_array_equal(correct(loaded, probs), apply_correction(loaded.H, probs, 0.9))
    assert loaded.describe()["apply_gate"] == 0.9


def test_version_1_with_a_nan_gate_is_refused(tmp_path):
    path = tmp_path / "old.npz"
    path.write_bytes(V1_FIXTURE.read_bytes())
    _rewrite(path, apply_gate=np.array(np.nan))
    with pytest.raises(CnnbalError, match="old.npz: corrupt H artifact, apply_gate is nan"):
        load_artifact(path)


# ---------------------------------------------------------------- hostile files


def _zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _with_header_shape(array: np.ndarray, shape, descr: str | None = None) -> bytes:
    """A .npy whose header declares ``shape`` (and ``descr``) but whose data is ``array``'s."""
    import io

    buffer = io.BytesIO()
    descr = descr or np.lib.format.dtype_to_descr(array.dtype)
    header = {"descr": descr, "fortran_order": False}
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": tuple(shape)})
    return buffer.getvalue() + array.tobytes()


HOSTILE = {
    # name: (changes to a valid affine artifact, expected message)
    "nan gate": ({"gate": np.array(np.nan)}, "gate is nan"),
    "negative gate": ({"gate": np.array(-1.0)}, "gate is -1.0"),
    "inf in H": ({"H": np.full((5, 6), np.inf)}, "H holds NaN or inf"),
    "huge finite H": ({"H": np.full((5, 6), 1e300)}, "H holds 1e\\+300 .*not a plausible"),
    "string n_classes": ({"n_classes": np.array("5")}, "n_classes is a string, expected an int"),
    "string format_version": ({"format_version": np.array("2")}, "format_version is a string"),
    "string H": ({"H": np.full((5, 6), "x")}, "H is a string, expected a float"),
    "bool n_val": ({"n_val": np.array(True)}, "n_val is a boolean"),
    "zero classes": (
        {
            "n_classes": np.array(0),
            "H": np.zeros((0, 1)),
            "class_names": np.array([], dtype=str),
            "val_class_accuracy": np.zeros(0),
            "val_class_counts": np.zeros(0, dtype=np.int64),
        },
        "0 classes",
    ),
    "unknown member": ({"extra": np.ones(3)}, "unknown member 'extra'"),
    "missing kind": ({"kind": None}, "missing kind"),
    "unknown kind": ({"kind": np.array("spline")}, "unknown correction kind 'spline'"),
    "kind without its arrays": ({"kind": np.array("logit_bias")}, "unknown member 'H'"),
    "accuracy above 1": ({"val_class_accuracy": np.full(5, 2.0)}, "outside \\[0, 1\\]"),
    "duplicate class names": ({"class_names": np.array(list("aabcd"))}, "duplicate class"),
    "params not an object": ({"params": np.array("[1, 2]")}, "params is not a JSON object"),
    "object array": ({"class_names": np.array(list("abcde"), dtype=object)}, "object array"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_naming_the_file(tmp_path, artifact, case):
    changes, message = HOSTILE[case]
    path = save_artifact(tmp_path / "H.npz", artifact)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    _zip(path, {f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()})
    with pytest.raises(CnnbalError, match=f"^H.npz: .*{message}"):
        load_artifact(path)


def test_hostile_containers(tmp_path, artifact):
    good = save_artifact(tmp_path / "good.npz", artifact)
    # a bare H, nothing else
    _zip(tmp_path / "bare.npz", {"H.npy": _npy_bytes(np.eye(3, 4))})
    with pytest.raises(CnnbalError, match=r"^bare.npz: not a cnnbal H artifact"):
        load_artifact(tmp_path / "bare.npz")
    # a .npy renamed .npz
    np.save(tmp_path / "array.npy", np.eye(3, 4))
    (tmp_path / "array.npy").rename(tmp_path / "renamed.npz")
    with pytest.raises(CnnbalError, match=r"^renamed.npz: .*a \.npy array, not an \.npz"):
        load_artifact(tmp_path / "renamed.npz")
    # a member without the .npy suffix
    with zipfile.ZipFile(good) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    _zip(tmp_path / "suffix.npz", {**members, "notes.txt": b"hello"})
    with pytest.raises(CnnbalError, match=r"^suffix.npz: .*'notes.txt' is not a \.npy array"):
        load_artifact(tmp_path / "suffix.npz")


def test_a_huge_declared_shape_is_refused_before_reading(tmp_path, artifact):
    """The .npy header of H claims 10^5 x (10^5 + 1) floats (80 GB); nothing is allocated."""
    good = save_artifact(tmp_path / "good.npz", artifact)
    with zipfile.ZipFile(good) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    members["params.npy"] = _with_header_shape(np.zeros(1), (), descr="<U99999999")
    _zip(tmp_path / "long.npz", members)
    with pytest.raises(CnnbalError, match=r"^long.npz: .*params is a string of 399,999,996 bytes"):
        load_artifact(tmp_path / "long.npz")
    members["params.npy"] = _npy_bytes(np.array("{}"))
    members["H.npy"] = _with_header_shape(np.zeros(4), (100_000, 100_001))
    _zip(tmp_path / "huge.npz", members)
    with pytest.raises(CnnbalError, match=r"^huge.npz: .*H has shape \(100000, 100001\)"):
        load_artifact(tmp_path / "huge.npz")
    # consistent with a huge n_classes, but the data is not there
    members["n_classes.npy"] = _npy_bytes(np.array(100_000))
    _zip(tmp_path / "short.npz", members)
    with pytest.raises(CnnbalError, match=r"^short.npz: corrupt H artifact, H is truncated"):
        load_artifact(tmp_path / "short.npz")


def test_size_limits_refuse_big_and_inflating_members(tmp_path, monkeypatch):
    probs, labels = make_outputs(2000, 40, seed=1)
    art = Artifact.from_fit(fit_naive(probs, labels))  # H: 40 x 41 float64 = 13 kB
    path = save_artifact(tmp_path / "H.npz", art)
    monkeypatch.setattr(artifact_module, "MAX_ARTIFACT_BYTES", 10_000)
    with pytest.raises(CnnbalError, match=r"^H.npz: .*members declare more than"):
        load_artifact(path)
    monkeypatch.setattr(artifact_module, "MAX_ARTIFACT_BYTES", 1 << 30)
    zeros = Artifact.from_fit(fit_naive(probs, labels))
    object.__setattr__(zeros.correction, "params", {"H": np.zeros((40, 41)), "gate": np.inf})
    with np.load(save_artifact(tmp_path / "Z.npz", zeros), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez_compressed(tmp_path / "Z.npz", **arrays)  # H deflates ~100x
    monkeypatch.setattr(artifact_module, "_DEFLATE_FREE", 1000)
    with pytest.raises(CnnbalError, match=r"^Z.npz: .*member 'H' would inflate"):
        load_artifact(tmp_path / "Z.npz")
    monkeypatch.setattr(artifact_module, "_DEFLATE_FREE", 16 << 20)
    assert load_artifact(tmp_path / "Z.npz").kind == "affine"  # compressed but small: fine


def test_a_correction_that_gives_nan_is_caught_when_applied():
    """The loader refuses huge parameters; correct() still never returns NaN silently."""
    probs, labels = make_outputs(30, 3)
    art = Artifact.from_fit(fit_naive(probs, labels))
    huge = Artifact(**{**art.__dict__, "correction": Correction.affine(np.full((3, 4), 1e308))})
    with pytest.raises(CnnbalError, match="H.npz: the affine correction gives non-finite"):
        correct(huge, probs, name="H.npz")


@pytest.mark.parametrize("command", ["info", "apply", "evaluate"])
def test_cli_says_one_line_exit_2_for_a_hostile_artifact(tmp_path, artifact, command):
    path = save_artifact(tmp_path / "H.npz", artifact)
    _rewrite(path, gate=np.array(np.nan))
    probs, labels = make_outputs(40, 5)
    np.savez(tmp_path / "test.npz", probs=probs, labels=labels)
    args = {
        "info": ["info", path],
        "apply": ["apply", path, tmp_path / "test.npz", "-o", tmp_path / "out.npz"],
        "evaluate": ["evaluate", tmp_path / "test.npz", "-H", path],
    }[command]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    assert result.stderr == "error: H.npz: corrupt H artifact, gate is nan\n"
    assert not (tmp_path / "out.npz").exists()
