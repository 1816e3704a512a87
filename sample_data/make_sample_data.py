"""Regenerate cnnbal's bundled sample data (softmax outputs of a small CNN).

A small CNN is trained on scikit-learn's bundled 8x8 digit images with a
long-tailed training split (the rarest classes keep about 5% of their
images), so that the minority classes come out clearly weaker, as in real
imbalanced data. Its softmax outputs on a balanced validation split and a
balanced test split are written next to this script:

    val.parquet, test.parquet   id, label, probs (fixed-size list of 10 float32)
    val.npz, test.npz           probs (float32 N x 10), labels, class_names
    test_logits.npz             logits (float32 N x 10), labels

Everything is seeded and run single-threaded with deterministic algorithms,
so re-running gives the same arrays. Usage (needs the ``sample`` extra):

    pip install -e '.[sample]' && python sample_data/make_sample_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUM_CLASSES = len(CLASS_NAMES)
# Fractions of the 1797 images in the train / val / test splits (stratified).
VAL_FRACTION = 0.25
TEST_FRACTION = 0.25
# Long tail: the class of rank r (in a shuffled class order) keeps
# TAIL_MIN ** (r / (K - 1)) of its training images, 1.0 down to TAIL_MIN.
TAIL_MIN = 0.05
EPOCHS = 60
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4

OUT_DIR = Path(__file__).resolve().parent
META_KEY = b"cnnbal.class_names"


def set_deterministic(seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test split, then a long-tailed subsample of train."""
    idx = np.arange(len(labels))
    train, rest = train_test_split(
        idx,
        test_size=VAL_FRACTION + TEST_FRACTION,
        stratify=labels,
        random_state=seed,
    )
    val, test = train_test_split(
        rest,
        test_size=TEST_FRACTION / (VAL_FRACTION + TEST_FRACTION),
        stratify=labels[rest],
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(NUM_CLASSES)  # order[r] is the class of rank r
    kept = []
    for rank, cls in enumerate(order):
        members = np.sort(train[labels[train] == cls])
        fraction = TAIL_MIN ** (rank / (NUM_CLASSES - 1))
        n_keep = max(2, round(fraction * len(members)))
        kept.append(rng.choice(members, size=n_keep, replace=False))
    train = np.sort(np.concatenate(kept))
    return train, np.sort(val), np.sort(test)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def train_model(images: torch.Tensor, labels: torch.Tensor, seed: int) -> SmallCNN:
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH_SIZE):
            batch = perm[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def write_parquet(path: Path, ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> None:
    probs_type = pa.list_(pa.float32(), NUM_CLASSES)
    flat = pa.array(probs.astype(np.float32).ravel(), type=pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids.astype(np.int64)),
            "label": pa.array(labels.astype(np.int64)),
            "probs": pa.FixedSizeListArray.from_arrays(flat, type=probs_type),
        }
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(CLASS_NAMES).encode()})
    pq.write_table(table, path, use_dictionary=False)


def per_class_accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    pred = probs.argmax(axis=1)
    return np.array([np.mean(pred[labels == k] == k) for k in range(NUM_CLASSES)])


def main() -> None:
    set_deterministic(SEED)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train, val, test = split_indices(labels, SEED)

    x = torch.from_numpy(images).unsqueeze(1)  # N x 1 x 8 x 8
    y = torch.from_numpy(labels)
    model = train_model(x[train], y[train], SEED)

    counts = np.bincount(labels[train], minlength=NUM_CLASSES)
    print("train images per class:", dict(zip(CLASS_NAMES, counts.tolist(), strict=True)))
    class_names = np.array(CLASS_NAMES)
    with torch.no_grad():
        for name, idx in (("val", val), ("test", test)):
            logits = model(x[idx]).numpy().astype(np.float32)
            probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy().astype(np.float32)
            write_parquet(OUT_DIR / f"{name}.parquet", idx, labels[idx], probs)
            np.savez(
                OUT_DIR / f"{name}.npz",
                probs=probs,
                labels=labels[idx],
                class_names=class_names,
            )
            if name == "test":
                np.savez(OUT_DIR / "test_logits.npz", logits=logits, labels=labels[idx])
            acc = per_class_accuracy(probs, labels[idx])
            total = np.mean(probs.argmax(axis=1) == labels[idx])
            print(f"{name}: n={len(idx)} accuracy={total:.4f}")
            print(
                "  per class:",
                " ".join(f"{c}={a:.3f}" for c, a in zip(CLASS_NAMES, acc, strict=True)),
            )


if __name__ == "__main__":
    main()
