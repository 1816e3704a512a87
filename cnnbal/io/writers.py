"""Writers: atomic outputs, streamed parquet/CSV tables, the input file hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal.errors import CnnbalError

if TYPE_CHECKING:  # pragma: no cover
    pass

from cnnbal.io.options import CHUNK_ROWS, CLASS_NAMES_KEY

if TYPE_CHECKING:  # pragma: no cover
    from cnnbal.io.readers import _TableLayout


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, streamed (recorded in the H artifact)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_not_input(target: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Raise if ``target`` is (or links to) one of ``inputs``: outputs never replace inputs."""
    target = Path(target)
    for src in inputs:
        src = Path(src)
        if target.resolve() == src.resolve() or (
            target.exists() and src.exists() and os.path.samefile(target, src)
        ):
            raise CnnbalError(f"{target.name}: refusing to overwrite the input file {src.name}")


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *inputs: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any failure (including Ctrl-C) the temporary file is removed and
    ``target`` is left as it was. Refuses a ``target`` that is one of ``inputs``.
    """
    target = Path(target)
    check_not_input(target, *inputs)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CnnbalError(f"{target}: directory {directory} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class TableWriter:
    """Streams record batches to parquet or CSV (chosen by the target's suffix).

    CSV is written as people and other tools expect: a header, numbers
    unquoted and in their shortest round-trip form (float32 columns stay
    short), strings quoted only when they hold the delimiter, a quote or a
    line break.

    Parquet is written without dictionary encoding (it only makes float columns
    bigger and slower, docs/method.md section 7.7) in row groups of at most :data:`CHUNK_ROWS`.
    Float columns are stored uncompressed: snappy saves about 2.5% on softmax
    scores and costs about 20% of the write time; other columns (ids, paths)
    keep snappy.
    """

    def __init__(self, tmp_path: Path, suffix: str, class_names: list[str] | None):
        self.tmp_path = tmp_path
        self.csv = suffix == ".csv"
        self.class_names = class_names
        self._writer = None

    def write(self, batch) -> None:
        if self._writer is None:
            schema = batch.schema
            if self.class_names is not None and not self.csv:
                meta = dict(schema.metadata or {})
                meta[CLASS_NAMES_KEY] = json.dumps(self.class_names).encode()
                schema = schema.with_metadata(meta)
            self._schema = schema
            if self.csv:
                self._writer = _CsvWriter(self.tmp_path, schema.names)
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                compression = {
                    field.name: "none" if pa.types.is_floating(_leaf_type(field.type)) else "snappy"
                    for field in schema
                }
                self._writer = pq.ParquetWriter(
                    str(self.tmp_path), schema, use_dictionary=False, compression=compression
                )
        if not self.csv:
            batch = batch.replace_schema_metadata(self._schema.metadata)
        self._writer.write_batch(batch, **({} if self.csv else {"row_group_size": CHUNK_ROWS}))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _CsvWriter:
    """CSV with minimal quoting: pyarrow's writer per batch, quoting only where needed."""

    def __init__(self, path: Path, names: list[str]):
        import pyarrow as pa

        self._file = pa.OSFile(str(path), "wb")
        self._file.write((",".join(_csv_field(n) for n in names) + "\n").encode("utf-8"))

    def write_batch(self, batch) -> None:
        import pyarrow.csv as pacsv

        style = "needed" if _needs_quotes(batch) else "none"
        options = pacsv.WriteOptions(include_header=False, quoting_style=style)
        pacsv.write_csv(batch, self._file, options)

    def close(self) -> None:
        self._file.close()


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _needs_quotes(batch) -> bool:
    """Whether a string column of ``batch`` holds a comma, a quote or a line break."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if pc.any(pc.match_substring_regex(column, '[,"\n\r]')).as_py():
                return True
        elif not (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)
        ):
            return True  # dates, decimals, ...: let pyarrow decide
    return False


def _leaf_type(arrow_type):
    """The value type of a (nested) list type, else the type itself."""
    while hasattr(arrow_type, "value_type"):
        arrow_type = arrow_type.value_type
    return arrow_type


def probs_columns(probs: np.ndarray, layout: _TableLayout | None, *, flat: bool = False) -> dict:
    """Arrow columns holding ``probs`` in the layout of the input table.

    A list-column input gets a fixed-size list column ``probs``; a prefix-column
    input gets the same column names (``p_`` when the input held logits).
    ``flat`` forces K columns (CSV cannot hold a list column).
    """
    import pyarrow as pa

    k = probs.shape[1]
    if flat and (layout is None or layout.is_list):
        return {f"p_{j}": pa.array(probs[:, j]) for j in range(k)}
    if layout is None or layout.is_list:
        values = pa.array(np.ascontiguousarray(probs).reshape(-1))
        return {"probs": pa.FixedSizeListArray.from_arrays(values, k)}
    names = layout.score_columns if not layout.logits else tuple(f"p_{j}" for j in range(k))
    return {name: pa.array(probs[:, j]) for j, name in enumerate(names)}
