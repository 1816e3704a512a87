"""Reading, validating and writing model-output files: the only module that touches them.

Formats (README "File formats"):

- ``.npz``: probabilities under ``probs`` or ``predictions``, or logits under
  ``logits``; labels under ``labels``, ``ground_truth`` or ``targets``; optional
  ``class_names``.
- ``.npy``: a 2-D array of probabilities (or logits with ``logits=True``);
  labels from a separate ``.npy`` file.
- ``.parquet`` / ``.csv``: a ``label`` column (integers, or class names mapped
  through the class list) and either a list column ``probs`` / ``logits`` or
  K numeric columns sharing a prefix (``p_0 .. p_{K-1}`` by default). Other
  columns pass through :func:`apply_file` untouched. Class names come from the
  parquet schema metadata key ``cnnbal.class_names`` (a JSON list) or a text
  file with one name per line.

Every problem is a :class:`~cnnbal.errors.CnnbalError` whose message starts
with the file name. Arrays leaving this module are validated: finite,
non-negative, rows summing to 1 within :data:`ROW_SUM_TOLERANCE`, labels
integer and in range; subnormal values are flushed to zero (they slow BLAS by
2-4x, docs/method.md section 7.5).
"""

from cnnbal.io.datasets import Dataset, Shard, open_dataset
from cnnbal.io.options import (
    CHUNK_ROWS,
    CLASS_NAMES_KEY,
    ROW_SUM_TOLERANCE,
    SUFFIXES,
    Outputs,
    ReadOptions,
)
from cnnbal.io.readers import Chunk, ChunkSource, iter_chunks, read_npz_extras, read_outputs
from cnnbal.io.validation import (
    check_probs,
    read_class_names,
    softmax,
    validate_labels,
    validate_probs,
)
from cnnbal.io.writers import (
    TableWriter,
    atomic_output,
    check_not_input,
    check_output_path,
    check_outputs,
    file_sha256,
    probs_columns,
)

__all__ = [
    "CHUNK_ROWS",
    "CLASS_NAMES_KEY",
    "ROW_SUM_TOLERANCE",
    "SUFFIXES",
    "Chunk",
    "ChunkSource",
    "Dataset",
    "Outputs",
    "ReadOptions",
    "Shard",
    "TableWriter",
    "atomic_output",
    "check_not_input",
    "check_output_path",
    "check_outputs",
    "check_probs",
    "file_sha256",
    "iter_chunks",
    "open_dataset",
    "probs_columns",
    "read_class_names",
    "read_npz_extras",
    "read_outputs",
    "softmax",
    "validate_labels",
    "validate_probs",
]
