"""Writers: atomic outputs, streamed parquet/CSV tables, the input file hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnbal.errors import CnnbalError
from cnnbal.io.options import CHUNK_ROWS, CLASS_NAMES_KEY

if TYPE_CHECKING:  # pragma: no cover
    from cnnbal.io.readers import _TableLayout


class OutputWriteError(CnnbalError, OSError):
    """Writing an output failed (a full disk, a quota): still an ``OSError``, now naming
    the output instead of its temporary file, and one line from the CLI."""


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
        if _same_file(target, Path(src)):
            raise CnnbalError(
                f"{target.name}: refusing to overwrite the input file {Path(src).name}"
            )


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | None],
    *,
    suffixes: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Check a command's output paths before any work: the one place every command asks.

    No path named on the command line is written unless it is an output, and
    no two outputs of one command are the same file. Files are compared by
    resolved path (symbolic links followed) and, when both exist, by device
    and inode (hard links).

    Parameters
    ----------
    outputs : mapping of flag to path or None
        E.g. ``{"-o": Path("H.npz"), "--plot": None}``; None entries are skipped.
    inputs : mapping of flag to path or None
        Every other path of the command line (``{"VAL": ..., "--labels": ...}``).
    suffixes : mapping of flag to sequence of str, optional
        The suffixes (lower case, with the dot) each output may have: the
        format that will be written.

    Raises
    ------
    CnnbalError
        An output is an input, two outputs are one file, an output is a
        directory or in a missing directory, or has the wrong suffix.
    """
    named = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    for flag, target in named.items():
        check_output_path(target, (suffixes or {}).get(flag), flag=flag)
        for in_flag, src in inputs.items():
            if src is not None and _same_file(target, Path(src)):
                raise CnnbalError(
                    f"{target}: refusing to overwrite the input file ({flag} and {in_flag} "
                    "name the same file)"
                )
    flags = list(named)
    for i, first in enumerate(flags):
        for second in flags[i + 1 :]:
            if _same_file(named[first], named[second]):
                raise CnnbalError(
                    f"{named[second]}: {first} and {second} name the same file; "
                    "give each output its own path"
                )


def check_output_path(
    target: str | os.PathLike, suffixes: Sequence[str] | None = None, *, flag: str = ""
) -> None:
    """An output path must be writable-looking: an existing directory, no directory itself,
    and (with ``suffixes``) a suffix matching the format that will be written."""
    target = Path(target)
    where = f"{flag} " if flag else ""
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise CnnbalError(
            f"{target}: {where}must end with {' or '.join(suffixes)} (the format written), "
            f"got {target.suffix or 'no suffix'!r}"
        )
    if target.is_dir():
        raise CnnbalError(f"{target}: {where}is a directory, expected a file name")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CnnbalError(f"{target}: directory {directory} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: compare what can be compared
        if os.path.abspath(a) == os.path.abspath(b):
            return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _new_file_mode(target: Path) -> int:
    """The mode ``open(target, "w")`` leaves: the existing file's, else 0o666 less the umask."""
    with contextlib.suppress(OSError):
        info = os.stat(target)
        if stat.S_ISREG(info.st_mode):
            return stat.S_IMODE(info.st_mode)
    mask = os.umask(0)  # the only way to read the umask; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def _temp_name(target: Path) -> str:
    """A hidden temporary name beside ``target``, short enough for any legal ``target``.

    At most ~60 bytes whatever the target's length (NAME_MAX is 255 bytes): a
    bounded prefix of the name, so that a leftover is recognisable, and a
    random token.
    """
    stem = target.name.encode("utf-8", "surrogateescape")[:24].decode("utf-8", "ignore")
    return f".{stem}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike,
    *inputs: str | os.PathLike,
    suffixes: Sequence[str] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any failure (an exception, Ctrl-C, or SIGTERM/SIGHUP under the CLI) the
    temporary file is removed and ``target`` is left as it was. Refuses a
    ``target`` that is one of ``inputs``, and (with ``suffixes``) one whose
    suffix does not match the format written. The file ends with the mode
    ``open()`` would give it (the umask's, or the replaced file's), and an
    ``OSError`` while writing (a full disk) becomes a :class:`CnnbalError`
    naming ``target``.
    """
    target = Path(target)
    check_not_input(target, *inputs)
    check_output_path(target, suffixes)
    directory = target.parent if str(target.parent) else Path(".")
    mode = _new_file_mode(target)
    # ``tmp`` names the candidate before it is created, so that a signal that
    # lands right after the creation still finds it to remove (a 48-bit random
    # name: an existing file of that name is not a practical concern)
    tmp = None
    try:
        while True:
            tmp = directory / _temp_name(target)
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # pragma: no cover - a 48-bit token collision
                continue
            except OSError as exc:
                tmp = None
                raise CnnbalError(
                    f"{target}: cannot create a file in {directory}: {exc.strerror}"
                ) from None
            break
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        # an error of the output itself (a full disk): name the output, not the
        # temporary file; one that names another file (an input) goes on as it is
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            raise OutputWriteError(f"{target}: cannot write: {exc.strerror or exc}") from None
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

    def __init__(
        self,
        tmp_path: Path,
        suffix: str,
        class_names: list[str] | None,
        metadata: dict[bytes, bytes] | None = None,
    ):
        self.tmp_path = tmp_path
        self.csv = suffix == ".csv"
        self.class_names = class_names
        self.metadata = metadata or {}  # extra parquet schema metadata (CSV has none)
        self._writer = None

    def write(self, batch) -> None:
        if self._writer is None:
            schema = batch.schema
            if (self.class_names is not None or self.metadata) and not self.csv:
                meta = dict(schema.metadata or {})
                if self.class_names is not None:
                    meta[CLASS_NAMES_KEY] = json.dumps(self.class_names).encode()
                meta.update(self.metadata)
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
