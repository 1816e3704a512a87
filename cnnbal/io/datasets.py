"""Datasets: many shards read as one input, checked to agree before any work starts.

A dataset is what a user names on the command line: a file, a directory (its
supported files, recursively, sorted; names starting with ``.`` or ``_`` are
skipped, like pyarrow.dataset does), a quoted glob (``"shards/*.parquet"``,
``**`` included), several of these, or URIs that pyarrow's filesystems
understand (``file://``, ``s3://``, ``gs://``, ``hdfs://``)::

    from cnnbal.io import open_dataset
    dataset = open_dataset("shards/")            # or ["a.parquet", "b.parquet"], "s3://bucket/run/"
    for shard in dataset.shards:
        source = shard.open(require_labels=True)  # a ChunkSource: validated row blocks
        for chunk in source.chunks:
            ...

Every shard must agree on the number of classes, the layout (table or array,
and the same score columns) and the class names; :func:`open_dataset` reads
each shard's header (parquet footer, ``.npy``/``.npz`` array header, the first
CSV block) and names the first shard that differs. Directory names ``key=value``
(hive partitions) are kept in :attr:`Shard.partition` and in the relative
path that ``apply`` mirrors into its output folder.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from cnnbal.errors import CnnbalError
from cnnbal.io.options import (
    CHUNK_ROWS,
    H_SHA256_KEY,
    H_SHA256_MEMBER,
    LABEL_KEYS,
    LOGIT_KEYS,
    PROB_KEYS,
    SIDECAR_SUFFIX,
    SUFFIXES,
    ReadOptions,
)
from cnnbal.io.readers import ChunkSource, _first_line, iter_chunks

__all__ = ["Dataset", "Shard", "open_dataset", "recorded_h_sha256", "write_h_sidecar"]

_URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az")


@dataclass(frozen=True)
class Shard:
    """One file of a dataset; picklable, so it can be sent to worker processes.

    Attributes
    ----------
    location : str
        The local path, or the path inside ``filesystem`` for a remote shard.
    relpath : str
        POSIX path relative to the dataset root (a file named on its own: its
        name). ``apply`` writes the shard's output at this path under ``-o``.
    partition : tuple of (str, str)
        Hive partition keys from directory names ``key=value`` in ``relpath``.
    n_rows : int or None
        Row count when the header gives it (parquet, ``.npy``, ``.npz``).
    filesystem : pyarrow.fs.FileSystem or None
        None for a local file.
    """

    location: str
    relpath: str
    partition: tuple[tuple[str, str], ...] = ()
    n_rows: int | None = None
    filesystem: object | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """How messages name the shard."""
        return self.relpath

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.location).suffix.lower()

    def open(
        self,
        options: ReadOptions | None = None,
        *,
        chunk_rows: int = CHUNK_ROWS,
        require_labels: bool = False,
        decode_threads: bool = True,
    ) -> ChunkSource:
        """Open the shard for streaming (see :func:`cnnbal.io.iter_chunks`)."""
        return iter_chunks(
            self.location,
            options,
            chunk_rows,
            require_labels=require_labels,
            filesystem=self.filesystem,
            decode_threads=decode_threads,
        )


@dataclass(frozen=True)
class Dataset:
    """Shards that agree on classes and layout.

    Attributes
    ----------
    shards : tuple of Shard
        In sorted order (directories and globs) or the order given (several paths).
    n_classes : int
    class_names : list of str or None
    kind : str
        ``"table"`` (parquet/CSV) or ``"array"`` (``.npz``/``.npy``).
    options : ReadOptions
        How every shard is read.
    label : str
        How titles and messages name the dataset.
    """

    shards: tuple[Shard, ...]
    n_classes: int
    class_names: list[str] | None
    kind: str
    options: ReadOptions
    label: str

    @property
    def n_rows(self) -> int | None:
        """Total rows when every shard's header gives its count."""
        counts = [s.n_rows for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def is_single_file(self) -> bool:
        return len(self.shards) == 1


def open_dataset(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    options: ReadOptions | None = None,
    *,
    require_labels: bool = False,
) -> Dataset:
    """Find the shards of ``inputs`` and check that they agree.

    Parameters
    ----------
    inputs : path, URI, glob, or a sequence of them
    options : ReadOptions, optional
        ``labels_path`` (``--labels``) is only allowed for a single ``.npy``.
    require_labels : bool
        Every shard must carry labels (fit, evaluate).

    Returns
    -------
    Dataset

    Raises
    ------
    CnnbalError
        Nothing found, unreadable shards, symlink loops, two shards with the
        same relative path, or a shard that disagrees with the first one on
        class count, layout, class names or labels (named in the message).
    """
    options = options or ReadOptions()
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not items:
        raise CnnbalError("no input given")
    shards: list[Shard] = []
    for item in items:
        shards.extend(_expand(str(item)))
    _check_unique(shards)
    if options.labels_path is not None and len(shards) > 1:
        raise CnnbalError(
            f"{Path(options.labels_path).name}: --labels works with a single .npy input "
            f"({len(shards)} shards given; store labels inside .npz or parquet shards)"
        )
    first = _probe(shards[0], options, require_labels)
    shards[0] = first.shard
    for i in range(1, len(shards)):
        info = _probe(shards[i], options, require_labels)
        _check_agrees(info, first)
        shards[i] = info.shard
    plain_file = (
        len(items) == 1
        and len(shards) == 1
        and shards[0].relpath == Path(str(items[0]).rstrip("/")).name
    )
    label = shards[0].relpath if plain_file else _dataset_label(items, len(shards))
    return Dataset(tuple(shards), first.n_classes, first.class_names, first.kind, options, label)


# ------------------------------------------------------------------ discovery


def _expand(item: str) -> list[Shard]:
    scheme = item.split("://", 1)[0].lower() if "://" in item else None
    if scheme is not None:
        if scheme not in _URI_SCHEMES:
            raise CnnbalError(f"{item}: unsupported URI scheme {scheme + '://'!r}")
        return _expand_uri(item)
    return _expand_local(item)


def _expand_local(item: str) -> list[Shard]:
    path = Path(item)
    if glob.has_magic(item) and not os.path.lexists(item):
        base = _glob_base(item)
        matches = sorted(glob.glob(item, recursive=True))
        shards, seen = [], set()
        for match in matches:
            rel = PurePosixPath(Path(os.path.relpath(match, base or ".")).as_posix())
            if Path(match).is_dir():  # "run/*.parquet" matching Spark-style folders
                found = [(rel / sub, path) for sub, path in _walk_local(Path(match))]
            elif Path(match).suffix.lower() in SUFFIXES and not _hidden(Path(match).name):
                found = [(rel, Path(match))]
            else:
                continue
            for sub, path in found:
                if str(path) not in seen:  # "**" also matches files inside matched folders
                    seen.add(str(path))
                    shards.append(_local_shard(path, sub))
        if not shards:
            raise CnnbalError(f"{item}: no .npz, .npy, .parquet or .csv file matches")
        return shards
    if not os.path.lexists(item):
        raise CnnbalError(f"{item}: no such file or directory")
    try:
        is_dir = path.is_dir()
        path.stat()
    except OSError as exc:  # ELOOP: a link to itself; ENOENT: a dangling link
        if path.is_symlink():
            raise CnnbalError(
                f"{item}: a symbolic link to nothing (dangling, or a loop: {exc.strerror})"
            ) from None
        raise CnnbalError(f"{item}: cannot open ({exc.strerror or exc})") from None
    if not is_dir:
        return [_local_shard(path, PurePosixPath(path.name))]
    files = _walk_local(path)
    if not files:
        raise CnnbalError(f"{item}: is a directory with no .npz, .npy, .parquet or .csv file in it")
    return [_local_shard(p, rel) for rel, p in files]


def _walk_local(root: Path) -> list[tuple[PurePosixPath, Path]]:
    """Supported files under ``root``, sorted by relative path.

    Symlinked directories are followed once: a directory reached twice (a
    symlink loop, or two links to one folder) is an error, so no file is
    counted twice.
    """
    seen: dict[tuple[int, int], Path] = {}
    found: list[tuple[PurePosixPath, Path]] = []

    def visit(directory: Path, rel: PurePosixPath) -> None:
        try:
            st = directory.stat()
        except OSError as exc:
            raise CnnbalError(f"{directory}: cannot open ({exc.strerror or exc})") from None
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise CnnbalError(
                f"{directory}: directory already visited as {seen[key]} "
                "(a symbolic link loop or a second link to it)"
            )
        seen[key] = directory
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise CnnbalError(f"{directory}: cannot list ({exc.strerror or exc})") from None
        for entry in entries:
            if _hidden(entry.name):
                continue
            child = Path(entry.path)
            try:
                mode = os.stat(child).st_mode  # follows links
            except OSError as exc:
                if entry.is_symlink():
                    raise CnnbalError(
                        f"{child}: a symbolic link to nothing (dangling, or a loop: {exc.strerror})"
                    ) from None
                if Path(entry.name).suffix.lower() in SUFFIXES:
                    raise CnnbalError(f"{child}: cannot open ({exc.strerror or exc})") from None
                continue
            if stat.S_ISDIR(mode):
                visit(child, rel / entry.name)
            elif stat.S_ISREG(mode) and Path(entry.name).suffix.lower() in SUFFIXES:
                found.append((rel / entry.name, child))

    visit(root, PurePosixPath())
    found.sort(key=lambda pair: str(pair[0]))
    return found


def _expand_uri(uri: str) -> list[Shard]:
    import pyarrow.fs as pafs

    magic = glob.has_magic(uri.split("://", 1)[1])
    base_uri = _glob_base(uri) if magic else uri
    try:
        filesystem, base = _filesystem_from_uri(base_uri.rstrip("/") or base_uri)
    except Exception as exc:  # ArrowInvalid, OSError: unknown scheme, missing credentials
        raise CnnbalError(f"{uri}: cannot open ({_first_line(exc)})") from None
    if isinstance(filesystem, pafs.LocalFileSystem):
        local = base
        if magic:
            local = os.path.join(base, uri[len(base_uri) :].lstrip("/"))
        return _expand_local(local)
    try:
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise CnnbalError(f"{uri}: no such file or directory")
        if info.type == pafs.FileType.File and not magic:
            return [Shard(base, PurePosixPath(base).name, (), None, filesystem)]
        listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except CnnbalError:
        raise
    except Exception as exc:
        raise CnnbalError(f"{uri}: cannot list ({_first_line(exc)})") from None
    pattern = uri[len(base_uri) :].lstrip("/") if magic else None
    shards = []
    for entry in listing:
        if entry.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(entry.path).relative_to(PurePosixPath(base))
        if any(_hidden(part) for part in rel.parts) or rel.suffix.lower() not in SUFFIXES:
            continue
        if pattern is not None and not _glob_match(str(rel), pattern):
            continue
        shards.append(Shard(entry.path, str(rel), _partition(rel), None, filesystem))
    if not shards:
        raise CnnbalError(f"{uri}: no .npz, .npy, .parquet or .csv file found")
    return sorted(shards, key=lambda s: s.relpath)


def _filesystem_from_uri(uri: str):
    """pyarrow's filesystem for a URI and the path inside it (tests stand a remote one in)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _glob_match(rel: str, pattern: str) -> bool:
    import fnmatch

    if "**" in pattern:
        return fnmatch.fnmatch(rel, pattern.replace("**/", "*").replace("**", "*"))
    return rel.count("/") == pattern.count("/") and fnmatch.fnmatch(rel, pattern)


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _partition(rel: PurePosixPath) -> tuple[tuple[str, str], ...]:
    keys = []
    for part in rel.parts[:-1]:
        if "=" in part:
            key, value = part.split("=", 1)
            keys.append((unquote(key), unquote(value)))
    return tuple(keys)


def _local_shard(path: Path, rel: PurePosixPath) -> Shard:
    return Shard(str(path), str(rel), _partition(rel))


def _check_unique(shards: list[Shard]) -> None:
    by_rel: dict[str, Shard] = {}
    by_file: dict[tuple, Shard] = {}
    for shard in shards:
        if shard.filesystem is None:
            st = os.stat(shard.location)
            key = (st.st_dev, st.st_ino)
            if key in by_file:
                raise CnnbalError(
                    f"{shard.location}: the same file as {by_file[key].location} (given twice)"
                )
            by_file[key] = shard
        if shard.relpath in by_rel:
            raise CnnbalError(
                f"{shard.location}: same relative name {shard.relpath!r} as "
                f"{by_rel[shard.relpath].location} (outputs would collide)"
            )
        by_rel[shard.relpath] = shard


def _dataset_label(items: list, n_shards: int) -> str:
    named = str(items[0]) if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)"
    return f"{named} ({n_shards} shard{'s' if n_shards != 1 else ''})"


# ------------------------------------------------------------------ agreement


@dataclass(frozen=True)
class _ShardInfo:
    shard: Shard
    kind: str
    n_classes: int
    class_names: list[str] | None
    layout: tuple  # what the columns look like: equal for every shard


def _probe(shard: Shard, options: ReadOptions, require_labels: bool) -> _ShardInfo:
    """Read a shard's header: kind, K, class names, layout (no data for parquet/npy)."""
    if shard.suffix == ".npz" and shard.filesystem is None:
        info = _probe_npz(shard, options, require_labels)
        if info is not None:
            return info
    # the readers' own checks (and messages); an odd .npz is read whole here
    source = shard.open(options, require_labels=require_labels)
    n_classes = source.n_classes
    if n_classes is None:  # a list column: the first block says how wide it is
        first = next(iter(source.chunks))
        n_classes = int(first.probs.shape[1])
    if source.kind == "table":
        layout = (
            "table",
            source.layout.score_columns,
            source.layout.is_list,
            source.layout.logits,
            source.layout.label_column,
        )
    else:
        layout = ("array",)
    return _ShardInfo(
        _with_rows(shard, source.n_rows), source.kind, n_classes, source.class_names, layout
    )


def _probe_npz(shard: Shard, options: ReadOptions, require_labels: bool) -> _ShardInfo | None:
    """An .npz header without decompressing its arrays (they are read again per shard).

    None when the archive is anything but plain (not a zip, members without
    ``.npy``, named keys, odd shapes): the full reader then names the problem.
    """
    import zipfile

    import numpy as np

    from cnnbal.io.validation import read_class_names

    if options.score_column is not None or options.label_column is not None:
        return None
    try:
        with zipfile.ZipFile(shard.location) as archive:
            names = archive.namelist()
            members = {m[:-4]: m for m in names if m.endswith(".npy")}
            if len(members) != len(names):
                return None
            key = next((k for k in PROB_KEYS + LOGIT_KEYS if k in members), None)
            if key is None:
                return None
            with archive.open(members[key]) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(fh)
            has_labels = any(k in members for k in LABEL_KEYS)
            class_names = None
            if "class_names" in members:
                with archive.open(members["class_names"]) as fh:
                    stored = np.lib.format.read_array(fh, allow_pickle=False)
                if stored.ndim != 1:
                    return None
                class_names = [str(n) for n in stored.tolist()]
    except Exception:  # BadZipFile, OSError, ValueError: the reader says it in its words
        return None
    if len(shape) != 2 or (require_labels and not has_labels):
        return None
    if options.classes_path is not None:
        class_names = read_class_names(options.classes_path)
    if class_names is not None and (
        len(class_names) != shape[1] or len(set(class_names)) != len(class_names)
    ):
        return None
    return _ShardInfo(
        _with_rows(shard, int(shape[0])), "array", int(shape[1]), class_names, ("array",)
    )


def _with_rows(shard: Shard, n_rows: int | None) -> Shard:
    return Shard(shard.location, shard.relpath, shard.partition, n_rows, shard.filesystem)


def _check_agrees(info: _ShardInfo, first: _ShardInfo) -> None:
    name, ref = info.shard.relpath, first.shard.relpath
    if info.kind != first.kind:
        raise CnnbalError(
            f"{name}: {_a(info.kind)} file, but {ref} is {_a(first.kind)} file "
            "(every shard must have the same layout)"
        )
    if info.n_classes != first.n_classes:
        raise CnnbalError(f"{name}: {info.n_classes} classes, but {ref} has {first.n_classes}")
    if info.layout != first.layout:
        raise CnnbalError(
            f"{name}: columns differ from {ref} ({_describe_layout(info.layout)} vs "
            f"{_describe_layout(first.layout)})"
        )
    if info.class_names != first.class_names:
        if info.class_names is None or first.class_names is None:
            which = name if info.class_names is None else ref
            raise CnnbalError(f"{name}: class names differ from {ref} ({which} has none)")
        pairs = list(zip(info.class_names, first.class_names, strict=False))
        diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if diff is None:
            raise CnnbalError(
                f"{name}: {len(info.class_names)} class names, but {ref} has "
                f"{len(first.class_names)}"
            )
        raise CnnbalError(
            f"{name}: class names differ from {ref} at class {diff} "
            f"({info.class_names[diff]!r} vs {first.class_names[diff]!r})"
        )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _describe_layout(layout: tuple) -> str:
    if layout[0] == "array":
        return "an array"
    _, columns, is_list, logits, label = layout
    scores = columns[0] if is_list else f"{columns[0]}..{columns[-1]}"
    kind = "logits" if logits else "scores"
    return f"{kind} {scores}, labels {label or 'none'}"


# ------------------------------------------------------------------ applied-H records


def recorded_h_sha256(location: str | os.PathLike, filesystem=None) -> str | None:
    """The SHA-256 of the H that ``cnnbal apply`` recorded in a file, or None.

    Parquet: schema metadata ``cnnbal.h_sha256``; ``.npz``: the member
    ``cnnbal_h_sha256``; ``.npy`` and CSV (no room for metadata): the JSON
    sidecar ``FILE.cnnbal.json``. A file that cannot be read says None here;
    reading it for real reports the problem.
    """
    suffix = PurePosixPath(str(location)).suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            source = (
                str(location) if filesystem is None else filesystem.open_input_file(str(location))
            )
            meta = pq.read_schema(source).metadata or {}
            value = meta.get(H_SHA256_KEY)
            return value.decode() if value is not None else None
        if suffix == ".npz":
            import zipfile

            import numpy as np

            source = (
                str(location) if filesystem is None else filesystem.open_input_file(str(location))
            )
            with zipfile.ZipFile(source) as archive:
                member = H_SHA256_MEMBER + ".npy"
                if member not in archive.namelist():
                    return None
                with archive.open(member) as fh:
                    return str(np.lib.format.read_array(fh, allow_pickle=False))
        sidecar = str(location) + SIDECAR_SUFFIX
        if filesystem is None:
            if not os.path.exists(sidecar):
                return None
            with open(sidecar, encoding="utf-8") as fh:
                record = json.load(fh)
        else:
            import pyarrow.fs as pafs

            if filesystem.get_file_info(sidecar).type == pafs.FileType.NotFound:
                return None
            with filesystem.open_input_stream(sidecar) as fh:
                record = json.loads(fh.read())
        value = record.get(H_SHA256_KEY.decode()) if isinstance(record, dict) else None
        return str(value) if value is not None else None
    except (OSError, ValueError, KeyError):
        return None
    except Exception:  # pyarrow's ArrowInvalid on a damaged footer, zipfile.BadZipFile
        return None


def write_h_sidecar(target: str | os.PathLike, h_sha256: str, h_name: str) -> Path:
    """Write ``TARGET.cnnbal.json`` (atomically) recording the H applied to ``target``."""
    from cnnbal.io.writers import atomic_output

    sidecar = Path(str(target) + SIDECAR_SUFFIX)
    record = {H_SHA256_KEY.decode(): h_sha256, "h_name": h_name, "output": Path(target).name}
    with atomic_output(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return sidecar
