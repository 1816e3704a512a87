"""Hostile inputs through the real command line: one line, exit 2, nothing written, inputs intact.

Every case runs ``python -m cnnbal`` as a subprocess in one shared folder of
hostile files (made once per session); the cases run a few at a time to keep
the file fast. Each case asserts: exit code 2, exactly one line on stderr,
starting with ``error:`` and naming the file at fault, no traceback, no file
left behind (neither an output nor a temporary file) and every input
byte-identical afterwards.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_outputs

# (id, command line, text the one error line must contain: the file at fault and the problem)
CASES = [
    # --- files of the wrong kind
    ("npy-named-npz", "fit npy_as.npz -o o/H.npz", "npy_as.npz: a .npy array, not an .npz"),
    ("npz-named-npy", "fit npz_as.npy --labels y.npy -o o/H.npz", "npz_as.npy: an .npz archive"),
    ("npz-member-no-suffix", "fit nosuffix.npz -o o/H.npz", "nosuffix.npz: member 'probs'"),
    ("npz-garbage", "fit garbage.npz -o o/H.npz", "garbage.npz: not a readable .npz"),
    ("npz-empty-archive", "fit empty.npz -o o/H.npz", "empty.npz: no scores found"),
    ("npy-empty-file", "fit empty.npy --labels y.npy -o o/H.npz", "empty.npy"),
    ("parquet-empty-file", "fit empty.parquet -o o/H.npz", "empty.parquet: not a readable"),
    ("csv-empty-file", "fit empty.csv -o o/H.npz", "empty.csv: not a readable CSV"),
    ("input-is-directory", "fit folder.npz -o o/H.npz", "folder.npz: is a directory"),
    ("input-missing", "fit missing.npz -o o/H.npz", "missing.npz: no such file"),
    ("input-symlink-loop", "fit loop.npz -o o/H.npz", "loop.npz: a symbolic link to nothing"),
    ("input-symlink-cycle", "fit loopa.npz -o o/H.npz", "loopa.npz: a symbolic link to nothing"),
    ("input-dangling-link", "fit dangling.npz -o o/H.npz", "dangling.npz: a symbolic link"),
    ("input-unknown-suffix", "fit scores.txt -o o/H.npz", "scores.txt: unsupported file type"),
    # --- huge declared shapes: refused from the header, nothing allocated
    ("npy-huge-shape", "fit huge.npy --labels y.npy -o o/H.npz", "huge.npy: the header declares"),
    ("npz-huge-shape", "fit huge.npz -o o/H.npz", "huge.npz: 'probs': the header declares"),
    ("labels-huge-shape", "fit good.npy --labels huge.npy -o o/H.npz", "huge.npy: the header"),
    # --- table columns
    ("label-list-column", "fit listlabel.parquet -o o/H.npz", "listlabel.parquet: column 'label'"),
    ("label-struct-column", "fit structlabel.parquet -o o/H.npz", "structlabel.parquet: column"),
    ("label-bool-column", "fit boollabel.parquet -o o/H.npz", "boollabel.parquet: labels must"),
    ("duplicate-label-column", "fit dupcol.parquet -o o/H.npz", "dupcol.parquet: duplicate column"),
    ("duplicate-score-column", "fit dupcol2.parquet -o o/H.npz", "dupcol2.parquet: duplicate"),
    ("csv-header-not-utf8", "fit badhdr.csv -o o/H.npz", "badhdr.csv: column names are not UTF-8"),
    ("csv-cell-not-utf8", "fit badcell.csv -o o/H.npz", "badcell.csv"),
    ("string-score-column", "fit strcols.parquet -o o/H.npz", "strcols.parquet: column 'p_0'"),
    ("string-list-column", "fit strlist.parquet -o o/H.npz", "strlist.parquet: column 'probs'"),
    ("nested-list-column", "fit nestedlist.parquet -o o/H.npz", "nestedlist.parquet: column"),
    ("ragged-list-column", "fit ragged.parquet -o o/H.npz", "ragged.parquet: column 'probs'"),
    # --- values
    ("scores-nan", "fit nan.npz -o o/H.npz", "nan.npz: non-finite value"),
    ("scores-negative", "fit negative.npz -o o/H.npz", "negative.npz: negative probability"),
    ("rows-not-summing-to-1", "fit unnormalised.npz -o o/H.npz", "unnormalised.npz: row 0 sums"),
    ("scores-3d", "fit probs3d.npz -o o/H.npz", "probs3d.npz: expected a 2-D array"),
    ("scores-complex", "fit complex.npz -o o/H.npz", "complex.npz: scores must be numbers"),
    ("scores-struct", "fit structprobs.npz -o o/H.npz", "structprobs.npz"),
    ("one-class", "fit oneclass.npz -o o/H.npz", "oneclass.npz: need at least 2 classes"),
    ("labels-2d", "fit labels2d.npz -o o/H.npz", "labels2d.npz: labels must be 1-D"),
    ("labels-float-huge", "fit hugelabel.npz -o o/H.npz", "hugelabel.npz: label 1e+30 out of"),
    ("labels-uint64-huge", "fit uint64label.npz -o o/H.npz", "uint64label.npz: label 922"),
    ("labels-out-of-range", "fit outofrange.npz -o o/H.npz", "outofrange.npz: label 7 out of"),
    ("labels-fractional", "fit good.npy --labels yfrac.npy -o o/H.npz", "yfrac.npy: labels must"),
    ("labels-names-no-list", "fit strlabels.npz -o o/H.npz", "strlabels.npz: labels are class"),
    # --- class names
    ("npz-duplicate-names", "fit dupnames.npz -o o/H.npz", "dupnames.npz: duplicate class name"),
    ("parquet-duplicate-names", "fit dupnames.parquet -o o/H.npz", "dupnames.parquet: duplicate"),
    ("classes-duplicate", "fit good.npz --classes dup.txt -o o/H.npz", "dup.txt: class list has"),
    ("classes-too-few", "fit good.npz --classes three.txt -o o/H.npz", "3 class names for 4"),
    ("classes-not-utf8", "fit good.npz --classes latin1.txt -o o/H.npz", "latin1.txt: class list"),
    ("npz-names-2d", "fit names2d.npz -o o/H.npz", "names2d.npz: class_names must be 1-D"),
    ("apply-names-count", "apply H.npz good.npz --classes three.txt -o o/x.npz", "3 class names"),
    # --- flag values
    ("fit-beta-overflow", "fit good.npz --beta 1e6 -o o/H.npz", "good.npz: the fit overflows"),
    ("fit-alpha-overflow", "fit good.npz --alpha 1e300 -o o/H.npz", "the fit overflows float64"),
    ("fit-beta-nan", "fit good.npz --beta nan -o o/H.npz", "--beta must be a finite number"),
    ("fit-r-low-nan", "fit good.npz --r-low nan -o o/H.npz", "--r-low must be in [0, 1)"),
    ("fit-alpha-inf", "fit good.npz --alpha inf -o o/H.npz", "--alpha must be a finite number"),
    ("fit-method-unknown", "fit good.npz --method magic -o o/H.npz", "--method must be one of"),
    ("fit-max-drop-nan", "fit good.npz --max-total-drop nan", "--max-total-drop: must be >= 0"),
    ("fit-max-drop-negative", "fit good.npz --max-total-drop -1", "--max-total-drop: must be"),
    ("sweep-seed-negative", "sweep good.npz --seed -1", "--seed: must be >= 0, got -1"),
    ("sweep-folds-zero", "sweep good.npz --folds 0", "--folds: need at least 2 folds"),
    ("sweep-folds-too-many", "sweep good.npz --folds 100000", "--folds: 100000 folds for only"),
    ("sweep-beta-overflow", "sweep good.npz --beta 1e6", "the fit overflows float64"),
    ("sweep-alpha-overflow", "sweep good.npz --alpha 1e300", "the fit overflows float64"),
    ("sweep-r-low-nan", "sweep good.npz --r-low nan", "--r-low: nan is not a finite number"),
    ("sweep-center-short", "sweep good.npz --center 1,2", "--center: expected 4 numbers"),
    ("sweep-max-drop-nan", "sweep good.npz --max-total-drop nan", "--max-total-drop: must be"),
    # --- outputs: never an input, never twice the same file, the right suffix
    ("fit-o-is-val", "fit good.npz -o good.npz", "good.npz: refusing to overwrite the input"),
    ("fit-o-is-classes", "fit good.npz --classes names.npz -o names.npz", "(-o and --classes"),
    ("fit-o-is-labels", "fit good.npy --labels lab.npz -o lab.npz", "(-o and --labels"),
    ("fit-o-symlink-to-val", "fit good.npz -o alias.npz", "alias.npz: refusing to overwrite"),
    ("fit-o-hardlink-to-val", "fit good.npz -o hard.npz", "hard.npz: refusing to overwrite"),
    ("fit-o-wrong-suffix", "fit good.npz -o o/H.parquet", "o/H.parquet: -o must end with .npz"),
    ("fit-o-no-suffix", "fit good.npz -o o/H", "o/H: -o must end with .npz"),
    ("fit-o-missing-dir", "fit good.npz -o nowhere/H.npz", "directory nowhere does not exist"),
    ("fit-o-is-directory", "fit good.npz -o folder.npz", "folder.npz: -o is a directory"),
    ("apply-o-is-input", "apply H.npz good.npz -o good.npz", "(-o and INPUT name the same"),
    ("apply-o-is-h", "apply H.npz good.npz -o H.npz", "(-o and H name the same file)"),
    ("apply-o-is-labels", "apply H.npz good.npy --labels y.npy -o y.npy", "(-o and --labels"),
    ("apply-o-unknown-suffix", "apply H.npz good.npz -o o/x.txt", "x.txt: unsupported output type"),
    ("apply-o-other-family", "apply H.npz good.npz -o o/x.parquet", "write a array input"),
    ("apply-o-missing-dir", "apply H.npz good.npz -o nowhere/x.npz", "nowhere does not exist"),
    ("sweep-o-is-val", "sweep good.npz -o good.npz", "good.npz: refusing to overwrite the input"),
    ("sweep-o-is-test", "sweep good.npz --test test.npz -o test.npz", "(-o and --test name"),
    ("sweep-plot-is-h", "sweep good.npz -o o/H.npz --plot o/H.npz", "--plot must end with .png"),
    ("sweep-plot-wrong-suffix", "sweep good.npz --plot o/x.pdf", "o/x.pdf: --plot must end"),
    ("sweep-o-wrong-suffix", "sweep good.npz -o o/H.png", "o/H.png: -o must end with .npz"),
    # --- other commands on the same hostile files
    ("evaluate-npy-named-npz", "evaluate npy_as.npz", "npy_as.npz: a .npy array, not an .npz"),
    ("evaluate-huge-shape", "evaluate huge.npz", "huge.npz: 'probs': the header declares"),
    ("evaluate-duplicate-names", "evaluate dupnames.npz", "dupnames.npz: duplicate class name"),
    ("apply-npz-named-npy", "apply H.npz npz_as.npy -o o/x.npy", "npz_as.npy: an .npz archive"),
    ("apply-duplicate-columns", "apply H.npz dupcol2.parquet -o o/x.parquet", "dupcol2.parquet"),
    ("apply-huge-shape", "apply H.npz huge.npy -o o/x.npy", "huge.npy: the header declares"),
    # --- an H artifact path that is not a file: say what it is (not "no such file")
    ("info-h-directory", "info folder.npz", "folder.npz: is a directory, expected an H artifact"),
    ("info-h-missing", "info missing.npz", "missing.npz: no such file"),
    ("info-h-symlink-loop", "info loop.npz", "loop.npz: a symbolic link loop"),
    ("info-h-dangling-link", "info dangling.npz", "dangling.npz: a symbolic link to nothing"),
    ("info-h-permission-denied", "info locked.npz", "locked.npz: permission denied"),
    ("evaluate-h-symlink-loop", "evaluate good.npz -H loop.npz", "loop.npz: a symbolic link loop"),
    ("evaluate-h-symlink-cycle", "evaluate good.npz -H loopa.npz", "loopa.npz: a symbolic link"),
    ("evaluate-h-directory", "evaluate good.npz -H folder.npz", "folder.npz: is a directory"),
    ("apply-h-symlink-loop", "apply loop.npz good.npz -o o/x.npz", "loop.npz: a symbolic link"),
]
# file modes do not stop root: these cases cannot fail for root
_NOT_AS_ROOT = {"info-h-permission-denied"}


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _make_files(root: Path) -> None:
    probs, labels = make_outputs(300, 4, seed=3, weak=())
    (root / "o").mkdir()
    (root / "folder.npz").mkdir()
    np.savez(root / "good.npz", probs=probs, labels=labels)
    np.savez(root / "test.npz", probs=probs[:100], labels=labels[:100])
    np.save(root / "good.npy", probs)
    np.save(root / "y.npy", labels)
    np.save(root / "yfrac.npy", labels + 0.5)
    np.savez(root / "lab.npz", labels=labels)
    (root / "names.npz").write_text("a\nb\nc\nd\n")  # a class list whose name ends in .npz
    (root / "npy_as.npz").write_bytes(_npy_bytes(probs))
    (root / "npz_as.npy").write_bytes((root / "good.npz").read_bytes())
    with zipfile.ZipFile(root / "nosuffix.npz", "w") as archive:
        archive.writestr("probs", b"not an array")
        archive.writestr("labels.npy", _npy_bytes(labels))
    (root / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(root / "empty.npz")
    for name in ("empty.npy", "empty.parquet", "empty.csv"):
        (root / name).write_bytes(b"")
    (root / "scores.txt").write_text("0.5 0.5\n")
    os.symlink("loop.npz", root / "loop.npz")
    os.symlink("loopb.npz", root / "loopa.npz")
    os.symlink("loopa.npz", root / "loopb.npz")
    os.symlink("gone.npz", root / "dangling.npz")
    os.symlink("good.npz", root / "alias.npz")
    os.link(root / "good.npz", root / "hard.npz")

    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)}
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, header)
    huge.write(probs[:10].tobytes())
    (root / "huge.npy").write_bytes(huge.getvalue())
    with zipfile.ZipFile(root / "huge.npz", "w") as archive:
        archive.writestr("probs.npy", huge.getvalue())
        archive.writestr("labels.npy", _npy_bytes(labels))

    scores = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), 4)
    pq.write_table(
        pa.table({"label": pa.array([[int(v)] for v in labels]), "probs": scores}),
        root / "listlabel.parquet",
    )
    pq.write_table(
        pa.table({"label": pa.array([{"a": int(v)} for v in labels]), "probs": scores}),
        root / "structlabel.parquet",
    )
    pq.write_table(
        pa.table({"label": pa.array([True] * 300), "probs": scores}), root / "boollabel.parquet"
    )
    pq.write_table(
        pa.Table.from_arrays(
            [pa.array(labels), pa.array(labels), scores], ["label"] * 2 + ["probs"]
        ),
        root / "dupcol.parquet",
    )
    columns = [pa.array(labels), *(pa.array(probs[:, j]) for j in (0, 0, 1, 2, 3))]
    pq.write_table(
        pa.Table.from_arrays(columns, ["label", "p_0", "p_0", "p_1", "p_2", "p_3"]),
        root / "dupcol2.parquet",
    )
    (root / "badhdr.csv").write_bytes(b"label,p_\xff0,p_1\n0,0.5,0.5\n")
    (root / "badcell.csv").write_bytes(b"label,p_0,p_1\n0,0.5,0.5\n\xff\xfe,0.5,0.5\n")
    pq.write_table(
        pa.table({"label": pa.array([0, 1]), "p_0": ["x", "y"], "p_1": ["y", "x"]}),
        root / "strcols.parquet",
    )
    pq.write_table(
        pa.table({"label": pa.array([0, 1]), "probs": pa.array([["x", "y"]] * 2)}),
        root / "strlist.parquet",
    )
    pq.write_table(
        pa.table({"label": pa.array([0, 1]), "probs": pa.array([[[0.5, 0.5]]] * 2)}),
        root / "nestedlist.parquet",
    )
    pq.write_table(
        pa.table({"label": pa.array([0, 1]), "probs": pa.array([[0.5, 0.5], [0.2, 0.3, 0.5]])}),
        root / "ragged.parquet",
    )
    bad = probs.copy()
    bad[5, 1] = np.nan
    np.savez(root / "nan.npz", probs=bad, labels=labels)
    np.savez(root / "negative.npz", probs=probs - 0.1, labels=labels)
    np.savez(root / "unnormalised.npz", probs=probs * 2, labels=labels)
    np.savez(root / "probs3d.npz", probs=probs[None], labels=labels)
    np.savez(root / "complex.npz", probs=probs.astype(np.complex64), labels=labels)
    np.savez(root / "structprobs.npz", probs=np.zeros(300, dtype=[("a", "f4")]), labels=labels)
    np.savez(root / "oneclass.npz", probs=np.ones((300, 1), np.float32), labels=labels * 0)
    np.savez(root / "labels2d.npz", probs=probs, labels=labels[:, None])
    np.savez(root / "hugelabel.npz", probs=probs, labels=np.full(300, 1e30))
    np.savez(root / "uint64label.npz", probs=probs, labels=np.full(300, 2**63 + 5, np.uint64))
    np.savez(root / "outofrange.npz", probs=probs, labels=np.full(300, 7))
    np.savez(root / "strlabels.npz", probs=probs, labels=np.array(["a"] * 300))
    np.savez(root / "dupnames.npz", probs=probs, labels=labels, class_names=list("abac"))
    np.savez(root / "names2d.npz", probs=probs, labels=labels, class_names=[["a", "b"]] * 2)
    named = pa.table({"label": pa.array(labels), "probs": scores})
    pq.write_table(
        named.replace_schema_metadata({b"cnnbal.class_names": json.dumps(list("abad"))}),
        root / "dupnames.parquet",
    )
    (root / "dup.txt").write_text("a\nb\na\nc\n")
    (root / "three.txt").write_text("a\nb\nc\n")
    (root / "latin1.txt").write_bytes("caf\xe9\nb\nc\nd\n".encode("latin-1"))

    from cnnbal.pipeline import fit_file

    fit_file(root / "good.npz", root / "H.npz")
    (root / "locked.npz").write_bytes((root / "H.npz").read_bytes())
    (root / "locked.npz").chmod(0)


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as their target, files as their SHA-256)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        elif not os.access(path, os.R_OK):  # locked.npz, unless run as root
            entries[key] = f"unreadable:{path.stat().st_mtime_ns}"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _run(root: Path, command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "cnnbal", *command.split()],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="session")
def hostile(tmp_path_factory):
    """Run every case once (a few at a time); the tests then read their own result."""
    root = tmp_path_factory.mktemp("hostile")
    _make_files(root)
    before = _snapshot(root)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(CASES, pool.map(lambda case: _run(root, case[1]), CASES), strict=True))
    return root, before, _snapshot(root), results


def test_there_are_at_least_60_cases_with_distinct_ids():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_hostile_input_is_one_line_exit_2_and_leaves_everything_as_it_was(hostile, case):
    if case[0] in _NOT_AS_ROOT and os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    _, before, after, results = hostile
    result = results[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case[2] in lines[0]
    # nothing written anywhere (no output, no temporary file) and every input intact
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
