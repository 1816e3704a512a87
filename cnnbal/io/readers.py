"""Readers: whole files (:func:`read_outputs`) and streams of row blocks (:func:`iter_chunks`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from cnnbal import _buffers
from cnnbal.errors import CnnbalError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

from cnnbal.io.options import (
    CHUNK_ROWS,
    CLASS_NAMES_KEY,
    CSV_DELIMITERS,
    DEFAULT_PREFIXES,
    LABEL_COLUMNS,
    LABEL_KEYS,
    LOGIT_KEYS,
    PROB_KEYS,
    SUFFIXES,
    Outputs,
    ReadOptions,
)
from cnnbal.io.validation import (
    check_class_names,
    check_probs,
    read_class_names,
    validate_labels,
)


def read_outputs(
    path: str | os.PathLike,
    options: ReadOptions | None = None,
    *,
    require_labels: bool = True,
) -> Outputs:
    """Read and validate a whole outputs file.

    Parameters
    ----------
    path : str or PathLike
        ``.npz``, ``.npy``, ``.parquet`` or ``.csv``.
    options : ReadOptions, optional
    require_labels : bool
        Raise if the file carries no labels (``fit`` and ``evaluate`` need them).

    Returns
    -------
    Outputs
    """
    options = options or ReadOptions()
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        scores, is_logits, labels, names = _read_npz(path, options)
    elif suffix == ".npy":
        scores, is_logits, labels, names = _read_npy(path, options)
    else:
        table = _read_table(path, options)
        if table.num_rows == 0:  # before the columns: a header-only CSV has no types
            raise CnnbalError(f"{path.name}: no samples (0 rows)")
        layout = _TableLayout.detect(table.schema, path, options)
        scores = layout.scores(table)
        is_logits = layout.logits
        labels = layout.raw_labels(table)
        names = _schema_class_names(table.schema, path)
    is_logits = is_logits or options.logits
    # whole-file reads feed fit/evaluate: row-major suits their row-wise work
    probs, n_renormalized = check_probs(
        scores, path, logits=is_logits, renormalize=options.renormalize
    )
    probs = np.ascontiguousarray(probs)
    names = _class_names(names, options, probs.shape[1])
    if names is not None and len(names) != probs.shape[1]:
        raise CnnbalError(
            f"{path.name}: {len(names)} class names for {probs.shape[1]} score columns"
        )
    if labels is not None:
        labels = _labels_to_int(labels, names, path)
        labels = validate_labels(
            labels, probs.shape[0], probs.shape[1], _labels_source(path, options)
        )
    elif require_labels:
        raise CnnbalError(f"{path.name}: no labels found ({_label_hint(suffix)})")
    return Outputs(
        probs=probs, labels=labels, class_names=names, path=path, n_renormalized=n_renormalized
    )


def _class_names(
    names: list[str] | None, options: ReadOptions, n_classes: int | None = None
) -> list[str] | None:
    """--classes wins over the file's names, which win over names known elsewhere (H).

    Names known elsewhere are not used for a file with another class count
    (the caller reports that mismatch in its own words).
    """
    if options.classes_path is not None:
        return read_class_names(options.classes_path)
    fallback = options.fallback_class_names
    if names is None and fallback is not None:
        if n_classes is None or len(fallback) == n_classes:
            return list(fallback)
    return names


def _labels_source(path: Path, options: ReadOptions) -> Path:
    """The file the labels came from: --labels for a .npy input, else the input itself."""
    if path.suffix.lower() == ".npy" and options.labels_path is not None:
        return Path(options.labels_path)
    return path


def _label_hint(suffix: str) -> str:
    if suffix == ".npz":
        return "expected an array named " + " or ".join(LABEL_KEYS) + " (or --label-column KEY)"
    if suffix == ".npy":
        return "pass --labels FILE.npy"
    return "expected a column named 'label' or 'labels'; another name: --label-column NAME"


def _check_readable(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise CnnbalError(f"{path}: a symbolic link to nothing (dangling, or a loop)")
        raise CnnbalError(f"{path}: no such file")
    if path.is_dir():
        raise CnnbalError(f"{path}: is a directory, expected a file")
    if path.suffix.lower() not in SUFFIXES:
        raise CnnbalError(
            f"{path.name}: unsupported file type {path.suffix!r} (expected .npz, .npy, "
            ".parquet or .csv)"
        )


def _load_npz(path: Path, source=None):
    import zipfile

    try:
        loaded = np.load(path if source is None else source, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CnnbalError(f"{path.name}: not a readable .npz file ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CnnbalError(f"{path.name}: a .npy array, not an .npz archive (rename it to .npy)")
    return loaded


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    member = f"{key}.npy"
    if member not in archive.zip.namelist():
        raise CnnbalError(
            f"{path.name}: member {key!r} is not a .npy array (npz members are NAME.npy)"
        )
    with archive.zip.open(member) as fh:
        _check_npy_header(fh, archive.zip.getinfo(member).file_size, f"{path.name}: {key!r}")
    try:
        return archive[key]
    except ValueError:
        raise CnnbalError(
            f"{path.name}: array {key!r} holds Python objects; refusing to unpickle"
        ) from None
    except Exception as exc:  # zip/CRC errors surface here
        raise CnnbalError(f"{path.name}: array {key!r} is unreadable ({exc})") from None


def npz_keys(keys, options: ReadOptions | None, path: Path) -> tuple[str, bool, str | None]:
    """The score key, whether it holds logits, and the label key (or None) of an archive.

    ``options.score_column`` / ``options.label_column`` name the keys; otherwise
    the first of :data:`PROB_KEYS`, :data:`LOGIT_KEYS` and :data:`LABEL_KEYS`.
    """
    options = options or ReadOptions()
    keys = set(keys)
    found = ", ".join(sorted(keys)) or "none"
    if options.score_column is not None:
        if options.score_column not in keys:
            raise CnnbalError(
                f"{path.name}: no array {options.score_column!r} (from --score-column; "
                f"found: {found})"
            )
        score_key, is_logits = options.score_column, options.score_column in LOGIT_KEYS
    else:
        is_logits = False
        score_key = next((k for k in PROB_KEYS if k in keys), None)
        if score_key is None:
            score_key = next((k for k in LOGIT_KEYS if k in keys), None)
            is_logits = score_key is not None
        if score_key is None:
            raise CnnbalError(
                f"{path.name}: no scores found; expected an array named 'probs', "
                f"'predictions' or 'logits', or --score-column KEY (found: {found})"
            )
    if options.label_column is not None:
        if options.label_column not in keys:
            raise CnnbalError(
                f"{path.name}: no array {options.label_column!r} (from --label-column; "
                f"found: {found})"
            )
        label_key = options.label_column
    else:
        label_key = next((k for k in LABEL_KEYS if k in keys), None)
    return score_key, is_logits, label_key


def read_npz_extras(
    path: str | os.PathLike, options: ReadOptions | None = None, skip=()
) -> dict[str, np.ndarray]:
    """The arrays of an outputs ``.npz`` other than its scores and labels (ids, ...).

    Every score key (:data:`PROB_KEYS`, :data:`LOGIT_KEYS`, the one
    ``options.score_column`` names) and the label key are left out, and so is
    every name in ``skip``: what ``apply`` writes in their place.
    """
    path = Path(path)
    with _load_npz(path) as archive:
        score_key, _, label_key = npz_keys(archive.files, options, path)
        leave_out = {*skip, score_key, label_key, *PROB_KEYS, *LOGIT_KEYS}
        return {k: _npz_array(archive, k, path) for k in archive.files if k not in leave_out}


def _read_npz(path: Path, options: ReadOptions | None = None, source=None):
    with _load_npz(path, source) as archive:
        score_key, is_logits, label_key = npz_keys(archive.files, options, path)
        keys = set(archive.files)
        scores = _npz_array(archive, score_key, path)
        labels = _npz_array(archive, label_key, path) if label_key else None
        names = None
        if "class_names" in keys:
            stored = _npz_array(archive, "class_names", path)
            if stored.ndim != 1:
                raise CnnbalError(f"{path.name}: class_names must be 1-D, got shape {stored.shape}")
            names = check_class_names([str(n) for n in stored.tolist()], path)
    return scores, is_logits, labels, names


def _load_npy(path: Path, *, mmap: bool = False, source=None) -> np.ndarray:
    try:
        if source is not None:  # a file object (a remote shard): checked, then read whole
            size = source.seek(0, 2)
            source.seek(0)
            _check_npy_header(source, size, path.name)
            source.seek(0)
            return np.load(source, allow_pickle=False)
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                raise CnnbalError(
                    f"{path.name}: an .npz archive, not a .npy array (rename it to .npz)"
                )
            fh.seek(0)
            _check_npy_header(fh, os.fstat(fh.fileno()).st_size, path.name)
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        msg = "holds Python objects; refusing to unpickle" if "pickle" in str(exc) else str(exc)
        raise CnnbalError(f"{path.name}: {msg}") from None
    except (OSError, EOFError) as exc:
        raise CnnbalError(f"{path.name}: not a readable .npy file ({exc})") from None


def _check_npy_header(fh, size: int, where: str) -> None:
    """Refuse a .npy whose header declares more data than it holds, before allocating it.

    ``fh`` is at the start of the array; ``size`` is its length in bytes. A
    header that cannot be parsed is left to :func:`numpy.load` (and its error).
    """
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(fh)
    except Exception:  # not an array header: np.load names the problem
        return
    if dtype.hasobject:
        return  # refused by np.load (no unpickling)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    available = size - fh.tell()
    if declared > available:
        raise CnnbalError(
            f"{where}: the header declares shape {tuple(shape)} ({declared:,} bytes) but the "
            f"file holds {max(available, 0):,} bytes of data (truncated or corrupt)"
        )


def _read_npy(path: Path, options: ReadOptions):
    scores = _load_npy(path)
    labels = None
    if options.labels_path is not None:
        labels_path = Path(options.labels_path)
        _check_readable(labels_path)
        if labels_path.suffix.lower() != ".npy":
            raise CnnbalError(f"{labels_path.name}: --labels must be a .npy file")
        labels = _load_npy(labels_path)
    return scores, options.logits, labels, None


def csv_delimiter(path: Path, options: ReadOptions | None = None, filesystem=None) -> str:
    """The CSV field separator: ``options.delimiter``, else the one the header line uses.

    The header decides: of :data:`CSV_DELIMITERS`, the one it holds most often
    (outside quotes); a header with none of them is one column, read with ','.
    """
    if options is not None and options.delimiter is not None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(options.delimiter, options.delimiter)
        if len(delimiter) != 1:
            raise CnnbalError(
                f"--delimiter: expected one character (or 'tab'), got {options.delimiter!r}"
            )
        return delimiter
    try:
        if filesystem is None:
            with open(path, "rb") as fh:
                head = fh.readline(1 << 16).decode("utf-8", errors="replace")
        else:  # a remote shard: the first 64 KiB, up to the first line end
            with filesystem.open_input_stream(str(path)) as fh:
                head = fh.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    except OSError as exc:
        raise CnnbalError(f"{path.name}: cannot read ({exc.strerror})") from None
    unquoted = "".join(part for i, part in enumerate(head.split('"')) if i % 2 == 0)
    counts = {d: unquoted.count(d) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: counts[d])  # ties: the earlier (',') wins
    return best if counts[best] else ","


def _csv_parse_options(path: Path, options: ReadOptions | None, filesystem=None):
    import pyarrow.csv as pacsv

    return pacsv.ParseOptions(delimiter=csv_delimiter(path, options, filesystem))


def _read_table(path: Path, options: ReadOptions | None = None) -> pa.Table:
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        parse = _csv_parse_options(path, options)
        try:
            return pacsv.read_csv(path, parse_options=parse)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise CnnbalError(
                f"{path.name}: not a readable CSV file ({_first_line(exc)})"
            ) from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:
        _explain_schema(path)  # a clearer error when the schema alone says why
        raise CnnbalError(
            f"{path.name}: not a readable parquet file ({_first_line(exc)})"
        ) from None


def _explain_schema(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:
        return
    column_names(schema, path)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _schema_class_names(schema: pa.Schema, path: Path) -> list[str] | None:
    meta = schema.metadata or {}
    raw = meta.get(CLASS_NAMES_KEY)
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        raise CnnbalError(
            f"{path.name}: schema metadata 'cnnbal.class_names' is not JSON"
        ) from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CnnbalError(
            f"{path.name}: schema metadata 'cnnbal.class_names' is not a list of strings"
        )
    return check_class_names(names, path)


def _labels_to_int(labels, names: list[str] | None, path: Path) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype.kind not in "USO":
        return arr
    if names is None:
        raise CnnbalError(
            f"{path.name}: labels are class names but no class list is known "
            "(pass --classes FILE, one name per line, or -H with an H that stores names)"
        )
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(arr), dtype=np.int64)
    for i, name in enumerate(arr.tolist()):
        if name not in index:
            raise CnnbalError(f"{path.name}: unknown class name {name!r} at row {i}")
        out[i] = index[name]
    return out


@dataclass(frozen=True)
class _TableLayout:
    """Where the scores and labels live in a parquet/CSV table."""

    score_columns: tuple[str, ...]  # one list column, or K numeric columns in class order
    is_list: bool
    logits: bool
    label_column: str | None
    source: str = ""  # the file name, for messages

    @classmethod
    def detect(cls, schema: pa.Schema, path: Path, options: ReadOptions) -> _TableLayout:
        import pyarrow as pa

        names = column_names(schema, path)
        if options.label_column is not None:
            if options.label_column not in names:
                raise CnnbalError(
                    f"{path.name}: no column {options.label_column!r} (from --label-column; "
                    f"columns: {_column_list(names)})"
                )
            label_column = options.label_column
        else:
            label_column = next((c for c in LABEL_COLUMNS if c in names), None)
        if label_column is not None and pa.types.is_nested(schema.field(label_column).type):
            raise CnnbalError(
                f"{path.name}: column {label_column!r} must hold integers or class names, "
                f"got {schema.field(label_column).type}"
            )

        def list_column(name: str) -> bool:
            t = schema.field(name).type
            return (
                pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)
            )

        if options.score_column is not None:
            # a list column of that name, else K columns with it as prefix
            name = options.score_column
            if name in names and list_column(name):
                logits = options.logits or name in LOGIT_KEYS
                return cls((name,), True, logits, label_column, path.name)
            cols = _prefix_columns(names, name)
            if not cols:
                raise CnnbalError(
                    f"{path.name}: no list column {name!r} and no columns '{name}0', "
                    f"'{name}1', ... (from --score-column; columns: {_column_list(names)})"
                )
            return cls(cols, False, options.logits, label_column, path.name)
        if options.prob_prefix is not None:
            cols = _prefix_columns(names, options.prob_prefix)
            if not cols:
                raise CnnbalError(
                    f"{path.name}: no columns '{options.prob_prefix}0', "
                    f"'{options.prob_prefix}1', ... (from --prob-prefix)"
                )
            return cls(cols, False, options.logits, label_column, path.name)
        for name, is_logits in (("probs", False), ("logits", True)):
            if name in names:
                if not list_column(name):
                    raise CnnbalError(
                        f"{path.name}: column {name!r} must be a list of numbers per row, "
                        f"got {schema.field(name).type}"
                    )
                return cls((name,), True, is_logits or options.logits, label_column, path.name)
        for prefix, is_logits in DEFAULT_PREFIXES:
            cols = _prefix_columns(names, prefix)
            if cols:
                return cls(cols, False, is_logits or options.logits, label_column, path.name)
        hint = ""
        if path.suffix.lower() == ".csv" and len(names) == 1:
            hint = "; the header is one column: another delimiter? (--delimiter)"
        raise CnnbalError(
            f"{path.name}: no scores found; expected a list column 'probs' or 'logits', "
            "or columns p_0 .. p_{K-1}; another name: --score-column NAME "
            f"(columns: {_column_list(names)}){hint}"
        )

    @property
    def passthrough_exclude(self) -> set[str]:
        return set(self.score_columns)

    def scores(self, table) -> np.ndarray:
        """The score matrix of a table or record batch, shape (rows, K)."""
        import pyarrow as pa

        if self.is_list:
            column = table.column(self.score_columns[0])
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            return _list_to_matrix(column, self.score_columns[0], self.source)
        columns = []
        for name in self.score_columns:
            col = table.column(name)
            if col.null_count:
                raise CnnbalError(f"{self.source}: column {name!r} has missing values")
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                raise CnnbalError(f"{self.source}: column {name!r} must be numeric, got {col.type}")
            columns.append(col.to_numpy())
        dtype = np.result_type(*[c.dtype for c in columns])
        # one contiguous row per class: the copy is a memcpy per column, and the
        # (rows, K) view of it is column-major, which the core keeps end to end
        out = _buffers.empty((len(columns), len(columns[0])), dtype)
        for j, col in enumerate(columns):
            out[j] = col
        return out.T

    def raw_labels(self, table) -> np.ndarray | None:
        if self.label_column is None:
            return None
        col = table.column(self.label_column)
        if col.null_count:
            raise CnnbalError(f"{self.source}: column {self.label_column!r} has missing labels")
        return col.to_numpy(zero_copy_only=False)


def column_names(schema, path: Path) -> list[str]:
    """The column names of a table: UTF-8 text, each once (else a CnnbalError)."""
    try:
        names = list(schema.names)
    except UnicodeDecodeError:
        raise CnnbalError(f"{path.name}: column names are not UTF-8 text") from None
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise CnnbalError(f"{path.name}: duplicate column name(s) {', '.join(map(repr, repeated))}")
    return names


def _column_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit})" if len(names) > limit else "")


def _prefix_columns(names: list[str], prefix: str) -> tuple[str, ...]:
    cols = []
    while f"{prefix}{len(cols)}" in names:
        cols.append(f"{prefix}{len(cols)}")
    return tuple(cols)


def _list_to_matrix(array, name: str, source: str) -> np.ndarray:
    import pyarrow as pa

    if array.null_count:
        raise CnnbalError(f"{source}: column {name!r} has missing rows")
    n = len(array)
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        values = array.flatten()
    else:
        offsets = array.offsets.to_numpy()
        lengths = np.diff(offsets)
        if n and not np.all(lengths == lengths[0]):
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise CnnbalError(
                f"{source}: column {name!r}: rows have different lengths ({lengths[0]} then "
                f"{lengths[row]} at row {row})"
            )
        width = int(lengths[0]) if n else 0
        values = array.flatten()
    if values.null_count:
        raise CnnbalError(f"{source}: column {name!r} has missing values")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise CnnbalError(f"{source}: column {name!r} must hold numbers, got {values.type}")
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


# ---------------------------------------------------------------- streaming


@dataclass
class Chunk:
    """A block of rows from :func:`iter_chunks`.

    Attributes
    ----------
    probs : ndarray of shape (rows, n_classes)
        Validated probabilities.
    passthrough : pyarrow.RecordBatch or None
        Table inputs: every column but the scores (ids, paths, labels).
    labels : ndarray of shape (rows,) or None
        Array inputs: the labels, when the file has them.
    row_offset : int
        Index of the first row in the file.
    n_renormalized : int
        Rows of this block divided by their sum (``ReadOptions.renormalize``).
    """

    probs: np.ndarray
    passthrough: object | None
    labels: np.ndarray | None
    row_offset: int
    n_renormalized: int = 0


@dataclass
class ChunkSource:
    """An input opened for streaming: what it holds and an iterator over its rows."""

    path: Path
    kind: str  # "table" or "array"
    n_rows: int | None
    n_classes: int | None
    class_names: list[str] | None
    layout: _TableLayout | None
    chunks: Iterator[Chunk]


def iter_chunks(
    path: str | os.PathLike,
    options: ReadOptions | None = None,
    chunk_rows: int = CHUNK_ROWS,
    *,
    require_labels: bool = False,
    filesystem=None,
    decode_threads: bool = True,
) -> ChunkSource:
    """Open an outputs file for streaming in blocks of ``chunk_rows`` rows.

    Parquet is read record batch by record batch without pre-buffering, CSV
    through pyarrow's streaming reader, ``.npy`` through a memory map, so
    memory does not grow with the file (``.npz`` is read whole: it cannot be
    memory-mapped).

    Parameters
    ----------
    require_labels : bool
        Every chunk carries ``labels`` (int64, validated; table labels that are
        class names are mapped through the class list), and a file without
        labels is refused before any chunk is read. Without it table chunks
        keep their labels only in ``passthrough``.
    filesystem : pyarrow.fs.FileSystem, optional
        Read ``path`` through this filesystem (a remote shard: ``s3://`` and
        friends). ``.npz``/``.npy`` are then read whole.
    decode_threads : bool
        Parquet: decode the columns of a block on pyarrow's thread pool
        (faster alone; ``False`` spends less CPU time, for a caller whose
        other threads keep the cores busy).
    """
    options = options or ReadOptions()
    remote = filesystem is not None
    path = PurePosixPath(path) if remote else Path(path)
    if remote:
        if path.suffix.lower() not in SUFFIXES:
            _check_readable(Path(path))  # the same message for an unsupported type
    else:
        _check_readable(path)
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        source = _remote_bytes(filesystem, path) if remote else None
        if suffix == ".npz":
            scores, is_logits, labels, names = _read_npz(path, options, source)
        else:
            scores = _load_npy(path, mmap=True, source=source)
            is_logits, labels, names = options.logits, None, None
            if options.labels_path is not None:
                labels_path = Path(options.labels_path)
                _check_readable(labels_path)
                labels = _load_npy(labels_path)
        names = _class_names(names, options, scores.shape[1] if scores.ndim == 2 else None)
        if scores.ndim != 2:
            raise CnnbalError(
                f"{path.name}: expected a 2-D array (n_samples, n_classes), "
                f"got shape {scores.shape}"
            )
        check_class_names(names, path, scores.shape[1])
        if labels is not None:
            labels = _labels_to_int(labels, names, path)
            labels = validate_labels(
                labels, scores.shape[0], scores.shape[1], _labels_source(path, options)
            )
        elif require_labels:
            raise CnnbalError(f"{path.name}: no labels found ({_label_hint(suffix)})")
        logits = is_logits or options.logits

        def array_chunks() -> Iterator[Chunk]:
            if scores.shape[0] == 0:
                raise CnnbalError(f"{path.name}: no samples (0 rows)")
            for start in range(0, scores.shape[0], chunk_rows):
                block = np.asarray(scores[start : start + chunk_rows])
                probs, n_renormalized = check_probs(
                    block, path, logits=logits, row_offset=start, renormalize=options.renormalize
                )
                yield Chunk(
                    probs,
                    None,
                    None if labels is None else labels[start : start + chunk_rows],
                    start,
                    n_renormalized,
                )
                _release_rows(scores, start, start + chunk_rows)

        return ChunkSource(
            path, "array", scores.shape[0], scores.shape[1], names, None, array_chunks()
        )

    schema, n_rows, batches = _open_table_stream(
        path, chunk_rows, options, filesystem, decode_threads=decode_threads
    )
    layout = _TableLayout.detect(schema, path, options)
    n_columns = None if layout.is_list else len(layout.score_columns)
    names = _class_names(_schema_class_names(schema, path), options, n_columns)
    keep = [c for c in column_names(schema, path) if c not in layout.passthrough_exclude]
    if require_labels and layout.label_column is None:
        raise CnnbalError(f"{path.name}: no labels found ({_label_hint(suffix)})")

    def table_chunks() -> Iterator[Chunk]:
        offset = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            scores = layout.scores(batch)
            probs, n_renormalized = check_probs(
                scores,
                path,
                logits=layout.logits,
                row_offset=offset,
                renormalize=options.renormalize,
            )
            labels = None
            if require_labels:
                labels = _labels_to_int(layout.raw_labels(batch), names, path)
                labels = validate_labels(labels, probs.shape[0], probs.shape[1], path)
            yield Chunk(probs, batch.select(keep), labels, offset, n_renormalized)
            offset += batch.num_rows
        if offset == 0:
            raise CnnbalError(f"{path.name}: no samples (0 rows)")

    n_classes = None if layout.is_list else len(layout.score_columns)
    check_class_names(names, path, n_classes)
    return ChunkSource(path, "table", n_rows, n_classes, names, layout, table_chunks())


def _release_rows(array: np.ndarray, start: int, stop: int) -> None:
    """Drop the pages of rows ``start:stop`` of a memory-mapped array from this process.

    Pages of a memory map that were read stay resident and count in the
    process's RSS until the kernel needs them: streaming an 800 MB ``.npy``
    would show ~1 GB. Telling the kernel they are no longer needed keeps RSS
    at about one chunk (the file's pages stay in the page cache; the array
    is read-only, so a later access simply maps them again).
    """
    import mmap

    handle = getattr(array, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_DONTNEED") or not array.flags.c_contiguous:
        return
    row_bytes = array.strides[0]
    # np.memmap maps from an allocation-granularity boundary before its offset
    base = array.offset % mmap.ALLOCATIONGRANULARITY
    begin = base + start * row_bytes
    end = min(base + min(stop, array.shape[0]) * row_bytes, len(handle))
    begin -= begin % mmap.PAGESIZE
    if end > begin:
        handle.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _remote_bytes(filesystem, path: PurePosixPath):
    """A whole remote file as a seekable in-memory file (``np.load`` needs to seek)."""
    import io

    try:
        with filesystem.open_input_file(str(path)) as fh:
            return io.BytesIO(fh.read())
    except Exception as exc:  # pyarrow raises OSError subclasses and ArrowInvalid
        raise CnnbalError(f"{path}: cannot read ({_first_line(exc)})") from None


def _open_table_stream(
    path: Path,
    chunk_rows: int,
    options: ReadOptions | None = None,
    filesystem=None,
    *,
    decode_threads: bool = True,
):
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        parse = _csv_parse_options(path, options, filesystem)
        try:
            source = path if filesystem is None else filesystem.open_input_stream(str(path))
            reader = pacsv.open_csv(
                source, read_options=pacsv.ReadOptions(block_size=16 << 20), parse_options=parse
            )
        except Exception as exc:
            raise CnnbalError(
                f"{path.name}: not a readable CSV file ({_first_line(exc)})"
            ) from None

        def batches():
            try:
                yield from reader
            except Exception as exc:
                raise CnnbalError(f"{path.name}: unreadable CSV ({_first_line(exc)})") from None

        return reader.schema, None, batches()
    import pyarrow.parquet as pq

    try:
        source = path if filesystem is None else filesystem.open_input_file(str(path))
        pf = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:
        raise CnnbalError(
            f"{path.name}: not a readable parquet file ({_first_line(exc)})"
        ) from None

    def batches():
        try:
            yield from pf.iter_batches(batch_size=chunk_rows, use_threads=decode_threads)
        except Exception as exc:
            raise CnnbalError(f"{path.name}: unreadable parquet ({_first_line(exc)})") from None

    return pf.schema_arrow, pf.metadata.num_rows, batches()
