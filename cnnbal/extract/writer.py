"""The writer: probabilities batch by batch into one parquet file, atomically.

The file is written through :func:`cnnbal.io.atomic_output` (a temporary file
beside the output, renamed at the end) and :class:`cnnbal.io.TableWriter`, as
every other cnnbal output: the same file modes, temporary names and parquet
settings. Any operating-system error while writing (read-only folder,
permission, full disk) becomes a one-line :class:`CnnbalError` naming the
output, and leaves neither the output nor a temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.extract.sources import ImageSource

MAX_ROWS_PER_GROUP = 65536
# Rows are buffered up to about this many bytes of probs/logits before a row
# group is written: few, large row groups without memory growing with N.
_ROW_GROUP_BYTES = 32 * 2**20
# extract writes parquet only: the class names travel in its schema metadata,
# which a CSV cannot hold (an H fitted on named class folders would then not
# match the file).
OUTPUT_SUFFIX = ".parquet"


def check_output_path(
    out: Path, source: ImageSource | None = None, inputs: tuple[os.PathLike, ...] = ()
) -> None:
    """Refuse an output that is not a ``.parquet`` path in an existing folder, or is an input.

    Parameters
    ----------
    out : Path
        The output file.
    source : ImageSource, optional
        Its image files and array are inputs too.
    inputs : tuple of path
        Other files named on the command line (model, weights, labels, class names).

    Raises
    ------
    CnnbalError
    """
    if out.is_dir():
        raise CnnbalError(f"{out}: is a folder; expected a {OUTPUT_SUFFIX} file path")
    for input_path in inputs:
        if _same_file(out, Path(input_path)):
            raise CnnbalError(f"{out}: is an input file ({input_path}); choose another output path")
    if source is not None and out.exists() and _is_source_file(out.resolve(), source):
        raise CnnbalError(f"{out}: is an input file; choose another output path")
    if out.suffix.lower() != OUTPUT_SUFFIX:
        raise CnnbalError(
            f"{out}: extract writes parquet (class names live in its metadata); "
            f"name the output {out.with_suffix(OUTPUT_SUFFIX).name}"
        )
    if not out.parent.is_dir():
        raise CnnbalError(f"{out}: folder {out.parent} does not exist")


class OutputFile:
    """Context manager: a :class:`BatchWriter` on a temporary file, renamed onto ``out`` on success.

    On an exception (including Ctrl-C) the temporary file is removed and
    ``out`` is left as it was.
    """

    def __init__(self, out: Path, source: ImageSource, save_logits: bool, inputs=()):
        self.out = out
        self.source = source
        self.save_logits = save_logits
        self.inputs = tuple(inputs)
        self._atomic = None
        self.writer: BatchWriter | None = None

    def __enter__(self) -> BatchWriter:
        from cnnbal.io import atomic_output

        self._atomic = atomic_output(self.out, *self.inputs)
        try:
            temp_path = self._atomic.__enter__()
        except OSError as error:
            raise write_error(self.out, error) from None
        self.writer = BatchWriter(temp_path, self.out, self.source, self.save_logits)
        return self.writer

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            try:
                self.writer.close()
            except BaseException as close_error:
                self._atomic.__exit__(type(close_error), close_error, close_error.__traceback__)
                raise
            try:
                self._atomic.__exit__(None, None, None)  # the rename
            except OSError as rename_error:
                raise write_error(self.out, rename_error) from None
            return False
        self.writer.close_quietly()
        # removes the temporary file and lets the original exception propagate
        return bool(self._atomic.__exit__(kind, error, traceback))


class BatchWriter:
    """Buffers rows and writes them as row groups of a parquet file.

    Parameters
    ----------
    temp_path : Path
        The file written (a temporary file from :func:`cnnbal.io.atomic_output`).
    out : Path
        The final output, for error messages.
    source : ImageSource
        Gives the labels, names and class names of the rows.
    save_logits : bool
        Also write a ``logits`` column.
    """

    def __init__(self, temp_path: Path, out: Path, source: ImageSource, save_logits: bool):
        self.temp_path = temp_path
        self.out = out
        self.source = source
        self.save_logits = save_logits
        self.table_writer = None
        self.schema = None
        self.class_names: list[str] | None = None
        self.n_classes = 0
        self.n_rows = 0
        self.rows_per_group = MAX_ROWS_PER_GROUP
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.n_buffered = 0

    def add(self, positions: np.ndarray, probs: np.ndarray, logits: np.ndarray | None) -> None:
        """Add rows: image positions (B,) int, probs (B, K) float32, logits (B, K) or None."""
        if self.table_writer is None:
            self._open(probs.shape[1])
        self.buffer.append((positions, probs, logits))
        self.n_buffered += len(positions)
        self.n_rows += len(positions)
        if self.n_buffered >= self.rows_per_group:
            self._flush()

    def close(self) -> None:
        """Write the buffered rows and the parquet footer."""
        self._flush()
        try:
            if self.table_writer is not None:
                self.table_writer.close()
        except OSError as error:
            raise write_error(self.out, error) from None
        finally:
            self.table_writer = None

    def close_quietly(self) -> None:
        """Close after a failure (the file is about to be removed): errors do not matter."""
        try:
            if self.table_writer is not None:
                self.table_writer.close()
        except Exception:
            pass
        self.table_writer = None

    def _open(self, n_classes: int) -> None:
        import pyarrow as pa

        from cnnbal.io import TableWriter

        # no invented names ("0".."K-1"): they would clash with the real names
        # stored in an H fitted on class folders
        self.class_names = self.source.class_names
        self.n_classes = n_classes
        vector = pa.list_(pa.float32(), n_classes)
        fields = []
        if self.source.labels is not None:
            fields.append(pa.field("label", pa.int64()))
        fields.append(pa.field("probs", vector))
        if self.save_logits:
            fields.append(pa.field("logits", vector))
        fields.append(pa.field("path", pa.string()))
        # TableWriter puts the class names into the schema metadata
        self.schema = pa.schema(fields)
        bytes_per_row = 4 * n_classes * (2 if self.save_logits else 1) + 64
        self.rows_per_group = int(
            min(MAX_ROWS_PER_GROUP, max(1024, _ROW_GROUP_BYTES // bytes_per_row))
        )
        self.table_writer = TableWriter(self.temp_path, OUTPUT_SUFFIX, self.class_names)

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.buffer:
            return
        positions = np.concatenate([item[0] for item in self.buffer])
        columns = []
        if self.source.labels is not None:
            columns.append(pa.array(self.source.labels[positions], type=pa.int64()))
        columns.append(_vectors([item[1] for item in self.buffer]))
        if self.save_logits:
            columns.append(_vectors([item[2] for item in self.buffer]))
        columns.append(pa.array([self.source.name(int(i)) for i in positions], type=pa.string()))
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        try:
            self.table_writer.write(batch)
        except OSError as error:
            raise write_error(self.out, error) from None
        self.buffer = []
        self.n_buffered = 0


def write_error(out: Path, error: OSError) -> CnnbalError:
    """A one-line error for an OS error while writing ``out`` (permission, full disk, ...)."""
    reason = error.strerror or str(error).strip().splitlines()[0] or type(error).__name__
    return CnnbalError(f"{out}: cannot write the output ({reason})")


def _vectors(blocks: list[np.ndarray]):
    """(n, K) float32 blocks -> one fixed-size-list<float32>[K] array."""
    import pyarrow as pa

    values = np.concatenate(blocks).astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _same_file(out: Path, other: Path) -> bool:
    if out.resolve() == other.resolve():
        return True
    try:
        return out.exists() and other.exists() and os.path.samefile(out, other)
    except OSError:
        return False


def _is_source_file(resolved: Path, source: ImageSource) -> bool:
    if source.kind == "array":
        return source.path.resolve() == resolved
    if not resolved.is_relative_to(source.path.resolve()):
        return False
    # Resolve only the files that could match: one resolve per image would cost
    # seconds for a million images.
    return any(path.resolve() == resolved for path in source.files if path.name == resolved.name)
