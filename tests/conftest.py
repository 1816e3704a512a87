"""Shared fixtures: small synthetic model outputs with weak classes, and file writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def make_outputs(n_samples=600, n_classes=6, seed=0, weak=(0, 1), temperature=1.0):
    """Softmax outputs of a fake classifier: strong on most classes, weak on ``weak``.

    Returns probs (float32, rows sum to 1 within float32 rounding) and int64 labels.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.normal(0.0, 1.0, (n_samples, n_classes))
    boost = np.full(n_classes, 2.5)
    boost[list(weak)] = 0.6
    logits[np.arange(n_samples), labels] += boost[labels]
    logits /= temperature
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="session")
def sample():
    """The bundled sample data as arrays: val probs, val labels, test probs, test labels."""
    folder = Path(__file__).resolve().parents[1] / "sample_data"
    with np.load(folder / "val.npz", allow_pickle=False) as val:
        val_probs, val_labels = val["probs"], val["labels"]
    with np.load(folder / "test.npz", allow_pickle=False) as test:
        test_probs, test_labels = test["probs"], test["labels"]
    return val_probs, val_labels, test_probs, test_labels


@pytest.fixture
def outputs():
    return make_outputs()


def write_parquet(
    path, probs, labels=None, *, layout="list", class_names=None, extra=None, row_group_size=None
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    if extra:
        columns.update(extra)
    if labels is not None:
        columns["label"] = pa.array(labels)
    if layout == "list":
        columns["probs"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(probs).reshape(-1)), probs.shape[1]
        )
    else:
        for j in range(probs.shape[1]):
            columns[f"{layout}{j}"] = pa.array(probs[:, j])
    table = pa.table(columns)
    if class_names is not None:
        table = table.replace_schema_metadata({b"cnnbal.class_names": json.dumps(class_names)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_csv(path, probs, labels=None, prefix="p_"):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns = {}
    if labels is not None:
        columns["label"] = pa.array(labels)
    for j in range(probs.shape[1]):
        columns[f"{prefix}{j}"] = pa.array(probs[:, j].astype(np.float64))
    pacsv.write_csv(pa.table(columns), path)
    return path
