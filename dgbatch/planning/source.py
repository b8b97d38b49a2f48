"""The job's input: find it, check it before anything heavy loads, and cut it into fragments.

A fragment is a deterministic slice of the input (a Parquet file's row groups, a JSON Lines file's
run of lines, or a row range of a `datasets` dataset) that one planning task tokenizes. Fragments are
listed in a fixed order, so the same input always yields the same fragments, shards and default row ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch import template
from dgbatch.columns import OUTPUT_COLUMNS
from dgbatch.config import ConfigError, InputSection, StorageSection
from dgbatch.planning import jsonl

# An input column named as one dgbatch writes (`columns.OUTPUT_COLUMNS`), e.g. from an earlier job whose
# output is this job's input, is carried under PREVIOUS_PREFIX.
PREVIOUS_PREFIX = "prev_"
PARTITION_COLUMN = "partition"  # written when input.partition is set (a backfill's date or hour)


def carried_name(name: str, id_column: str | None) -> str:
    """An input column's name in the output. dgbatch's own columns from an earlier pass move under
    `prev_` (and an earlier `prev_x` to `prev_prev_x`), so a chained job shadows nothing; an input
    `id` used as input.id_column stays (it becomes the row id)."""
    if name == "id" and id_column == "id":
        return name
    base = name
    while base.startswith(PREVIOUS_PREFIX):
        base = base[len(PREVIOUS_PREFIX) :]
    return PREVIOUS_PREFIX + name if base in OUTPUT_COLUMNS else name


class InputError(ConfigError):
    """The input as a whole cannot be read as configured."""


class InputMissing(InputError):
    """input.path does not exist or matches no files (a backfill records such a partition as missing)."""


@dataclass(frozen=True)
class Fragment:
    index: int
    source: str  # file path (fsspec, no protocol) or datasets path
    label: str  # what default row ids are built from: a path relative to the input root
    row_groups: tuple[int, ...]  # Parquet row groups; empty for datasets
    row_start: int  # first row of the fragment within its file / dataset
    num_rows: int
    byte_offset: int = 0  # JSON Lines (plain files): where the fragment's first line starts
    first_line: int = 1  # JSON Lines: the line number of its first row (for error messages)
    schema: pa.Schema | None = None  # JSON Lines: the types every fragment's rows are read as


@dataclass(frozen=True)
class InputFile:
    """One input file as the job saw it: a change in any field means the job's plan no longer holds."""

    path: str  # relative to the input root (the fragment label)
    size: int
    version: str  # "etag:..." (object stores), "mtime:..." (local), or "dataset:<fingerprint>"
    rows: int

    def describe_change(self, now: InputFile | None) -> str:
        if now is None:
            return f"{self.path} (removed)"
        if now.size != self.size or now.rows != self.rows:
            return f"{self.path} ({self.rows} rows, {self.size} bytes -> {now.rows} rows, {now.size} bytes)"
        return f"{self.path} (rewritten: {self.version} -> {now.version})"


@dataclass(frozen=True)
class InputPlan:
    schema: pa.Schema
    fragments: list[Fragment]
    files: tuple[InputFile, ...] = ()
    scan_root: str = ""  # what the job reads: the directory, the glob's fixed prefix, or the one file

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.fragments)

    def identity(self) -> list[list]:
        """The input's identity as JSON: [path, size, version, rows] per file, in listing order."""
        return [[f.path, f.size, f.version, f.rows] for f in self.files]


def input_changes(before: list[list], now: list[list], limit: int = 5) -> list[str]:
    """What changed between two `InputPlan.identity()` values, one phrase per file ([] when nothing did)."""
    old = {f[0]: InputFile(*f) for f in before}
    new = {f[0]: InputFile(*f) for f in now}
    changes = [old[p].describe_change(new.get(p)) for p in old if new.get(p) != old[p]]
    changes += [f"{p} (new)" for p in new if p not in old]
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return changes


def _version(info: dict) -> str:
    for key, tag in (("ETag", "etag"), ("etag", "etag"), ("mtime", "mtime"), ("LastModified", "modified")):
        if info.get(key) is not None:
            return f"{tag}:{str(info[key]).strip(chr(34))}"
    return "unknown"


def _fs(section: InputSection, storage: StorageSection | None):
    from dgbatch.io.fs import filesystem

    return filesystem(section.path, storage)


def list_files(section: InputSection, storage: StorageSection | None) -> tuple[object, str, dict[str, dict], str]:
    """(fs, label root, {file: info} in a fixed order, scan root), from one listing."""
    fs, path = _fs(section, storage)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
        infos = {p: found[p] for p in sorted(found) if found[p].get("type") == "file"}
        root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        scan = root
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        infos = {p: found[p] for p in sorted(found)
                 if not any(part.startswith(("_", ".")) for part in p[len(path):].split("/"))}
        root = scan = path
    elif fs.exists(path):
        infos, root, scan = {path: fs.info(path)}, path.rsplit("/", 1)[0], path
    else:
        raise InputMissing(f"input.path {section.path!r} does not exist")
    if not infos:
        raise InputMissing(f"input.path {section.path!r} matched no files")
    return fs, root, infos, scan


def _schema_difference(a: pa.Schema, b: pa.Schema) -> str:
    """How schema `a` differs from `b`, in a few words."""
    parts = []
    missing = [n for n in b.names if n not in a.names]
    extra = [n for n in a.names if n not in b.names]
    if missing:
        parts.append(f"lacks columns {missing}")
    if extra:
        parts.append(f"has extra columns {extra}")
    for n in a.names:
        if n in b.names and a.field(n).type != b.field(n).type:
            parts.append(f"column {n!r} is {a.field(n).type}, not {b.field(n).type}")
    return "; ".join(parts) or "its schema metadata or column order differ"


def _is_text(typ: pa.DataType) -> bool:
    return (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ) or pa.types.is_string_view(typ))


def _is_messages(typ: pa.DataType) -> bool:
    """list<struct<role, content>>, content a string or a list of parts struct<type, ...>."""
    if not ((pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type)):
        return False
    fields = {f.name: f.type for f in typ.value_type}
    content = fields.get("content")
    if "role" not in fields or content is None:
        return False
    if _is_text(content) or pa.types.is_null(content):
        return True
    return ((pa.types.is_list(content) or pa.types.is_large_list(content)) and pa.types.is_struct(content.value_type)
            and "type" in {f.name for f in content.value_type})


def prompt_columns(section: InputSection) -> list[str]:
    """The input columns a row's prompt is built from (its image's too)."""
    key, value = section.prompt_source
    cols = sorted(template.columns(value)) if key == "input.template" else [value]
    return cols + ([section.image_column] if section.image_column else [])


def check_schema(schema: pa.Schema, section: InputSection, where: str, extra: Mapping[str, str] = {}) -> None:
    """Every column the job names exists, with a usable type. `extra`: more columns other parts of the
    job need (column -> the config key naming it)."""
    names = schema.names
    key, col = section.prompt_source
    if key == "input.template":
        missing = sorted(template.columns(col) - set(names))
        if missing:
            raise InputError(f"{where}: input.template uses {', '.join(map(repr, missing))}, not a column of the "
                             f"input; columns are {names}")
    elif col not in names:
        raise InputError(f"{where}: column {col!r} ({key}) not found; columns are {names}")
    elif section.prompt_column:
        typ = schema.field(col).type
        if not _is_text(typ):
            hint = "; for chat messages set input.messages_column" if pa.types.is_list(typ) else ""
            raise InputError(f"{where}: column {col!r} has type {typ}, expected string{hint}")
    elif not _is_messages(schema.field(col).type):
        raise InputError(
            f"{where}: column {col!r} has type {schema.field(col).type}, expected list<struct<role: string, "
            "content: string>> (content may also be a list of parts struct<type: string, text: string>)"
        )
    if section.image_column:
        if section.image_column not in names:
            raise InputError(f"{where}: image column {section.image_column!r} (input.image_column) not found; "
                             f"columns are {names}")
        t = schema.field(section.image_column).type
        if not any(f(t) for f in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string,
                                  pa.types.is_large_string, pa.types.is_binary_view, pa.types.is_string_view)):
            raise InputError(f"{where}: image column {section.image_column!r} has type {t}, expected binary "
                             "(PNG/JPEG bytes) or string (a path or URL)")
    named = {section.id_column: "input.id_column", section.reference_column: "input.reference_column",
             section.max_new_tokens_column: "input.max_new_tokens_column", **extra}
    for column, key in named.items():
        if column and column not in names:
            raise InputError(f"{where}: column {column!r} ({key}) not found; columns are {names}")
    if section.id_column:
        typ = schema.field(section.id_column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)
                or pa.types.is_integer(typ)):
            raise InputError(f"{where}: id column {section.id_column!r} has type {typ}; ids must be strings or "
                             f"integers")
    if section.partition is not None and PARTITION_COLUMN in names:
        raise InputError(f"{where}: input column {PARTITION_COLUMN!r} collides with the partition column dgbatch "
                         f"writes when input.partition is set (a backfill); rename it")
    budget = section.max_new_tokens_column
    if budget and not (pa.types.is_integer(schema.field(budget).type) or pa.types.is_null(schema.field(budget).type)):
        raise InputError(f"{where}: column {budget!r} (input.max_new_tokens_column) has type "
                         f"{schema.field(budget).type}, expected integers")


def inspect_input(section: InputSection, storage: StorageSection | None, fragment_rows: int,
                  extra: Mapping[str, str] = {}) -> InputPlan:
    """Read only metadata (one listing; Parquet footers / dataset info; JSON Lines: one streaming pass):
    cheap enough, and it fails before the model loads. `extra` as in `check_schema`."""
    if section.format == "datasets":
        return _inspect_datasets(section, fragment_rows, extra)
    if section.format == "jsonl":
        return _inspect_jsonl(section, storage, fragment_rows, extra)
    fs, root, infos, scan = list_files(section, storage)
    schema, fragments, files = None, [], []
    first = None
    for path, info in infos.items():
        rel = _relative(path, root)
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError, ValueError) as e:
            hint = "; for JSON Lines set input.format=jsonl" if path.endswith((".jsonl", ".jsonl.gz", ".json")) else ""
            raise InputError(f"input file {rel!r} is not a readable Parquet file ({_brief(e)}); input.format is "
                             f"parquet{hint}") from None
        check_schema(file_schema, section, f"input file {rel!r}", extra)
        if schema is None:
            schema, first = file_schema, rel
        elif not file_schema.equals(schema):
            raise InputError(f"input file {rel!r} has a different schema from {first!r}: it "
                             f"{_schema_difference(file_schema, schema)}; every input file needs the same columns")
        files.append(InputFile(rel, int(info.get("size") or 0), _version(info), meta.num_rows))
        if section.id_column:
            _refuse_null_ids(meta, section.id_column, rel)
        groups, start, rows = [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= fragment_rows or g == meta.num_row_groups - 1:
                fragments.append(Fragment(len(fragments), path, rel, tuple(groups), start, rows))
                start, groups, rows = start + rows, [], 0
    plan = InputPlan(schema, fragments, tuple(files), scan)
    if plan.num_rows == 0:
        raise InputError(f"input.path {section.path!r} holds no rows ({len(files)} file(s), all empty)")
    return plan


def _refuse_null_ids(meta, name: str, rel: str) -> None:
    """Null ids seen in the footer's statistics, before anything is read (planning checks the rest)."""
    leaves = [i for i in range(meta.num_columns) if meta.schema.column(i).path == name]  # Parquet leaf columns
    if not leaves:
        return
    column, start = leaves[0], 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        stats = rg.column(column).statistics
        if stats is not None and stats.has_null_count and stats.null_count:
            raise InputError(f"input file {rel!r} rows {start}-{start + rg.num_rows - 1}: input.id_column {name!r} "
                             f"has {stats.null_count} null value(s); every row needs an id (or unset input.id_column "
                             f"to use FILE:ROW ids)")
        start += rg.num_rows


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") or path.rsplit("/", 1)[-1]


def _inspect_jsonl(section: InputSection, storage: StorageSection | None, fragment_rows: int,
                   extra: Mapping[str, str]) -> InputPlan:
    import gzip
    import zlib

    fs, root, infos, scan = list_files(section, storage)
    files = list(infos)
    fields: dict[str, pa.DataType] = {}
    spans = []
    for path in files:
        try:
            file_spans, objects = jsonl.inspect_file(fs, path, fragment_rows, fields)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(f"input file {_relative(path, root)!r} cannot be read as JSON Lines ({e})") from None
        if file_spans and not objects:  # not one good line: this is no JSON Lines file (a stray file?)
            raise InputError(f"input file {_relative(path, root)!r} has no line holding a JSON object; "
                             "input.format is jsonl (one JSON object per line)")
        spans.append((path, file_spans))
    if not any(s for _, s in spans):
        raise InputError(f"input.path {section.path!r}: the JSON Lines input has no rows")
    schema = pa.schema(list(fields.items()))
    check_schema(schema, section, f"input.path {section.path!r}", extra)
    fragments = []
    for path, file_spans in spans:
        for sp in file_spans:
            fragments.append(Fragment(len(fragments), path, _relative(path, root), (), sp.row_start, sp.num_rows,
                                      sp.byte_offset, sp.first_line, schema))
    identity = tuple(InputFile(_relative(p, root), int(infos[p].get("size") or 0), _version(infos[p]),
                               sum(sp.num_rows for sp in file_spans)) for p, file_spans in spans)
    return InputPlan(schema, fragments, identity, scan)


def _load_dataset(section: InputSection):
    import datasets

    try:
        ds = datasets.load_from_disk(section.path)
    except FileNotFoundError:
        try:
            ds = datasets.load_dataset(section.path, split=section.split)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read"
            raise InputError(f"input.path {section.path!r}: not a saved dataset and not loadable by name ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if section.split is None:
            raise InputError(f"input.path {section.path!r} holds splits {list(ds)}; set input.split")
        if section.split not in ds:
            raise InputError(f"input.split {section.split!r} not in {list(ds)}")
        ds = ds[section.split]
    return ds


def _inspect_datasets(section: InputSection, fragment_rows: int, extra: Mapping[str, str]) -> InputPlan:
    ds = _load_dataset(section)
    schema = ds.features.arrow_schema
    check_schema(schema, section, f"dataset {section.path!r}", extra)
    n = len(ds)
    if n == 0:
        raise InputError(f"dataset {section.path!r} holds no rows")
    label = section.path.rstrip("/").rsplit("/", 1)[-1]
    frags = [Fragment(i, section.path, label, (), s, min(fragment_rows, n - s))
             for i, s in enumerate(range(0, n, fragment_rows))]
    files = (InputFile(label, 0, f"dataset:{getattr(ds, '_fingerprint', 'unknown')}", n),)
    return InputPlan(schema, frags, files, section.path.rstrip("/"))


def read_fragment(frag: Fragment, section: InputSection, storage: StorageSection | None,
                  head: bool = False, columns: list[str] | None = None) -> pa.Table:
    """The fragment's rows (all columns, or `columns`); with `head`, only the first ~1024 and the prompt's
    columns (for sampling). JSON Lines tables carry `jsonl.READ_ERROR`: each line's read error, or None.
    A file that cannot be decoded (corrupt pages, rewritten meanwhile) raises InputError."""
    if section.format == "datasets":
        ds = _load_dataset(section)  # memory-mapped; indexing honours any select/shuffle mapping
        stop = frag.row_start + (min(frag.num_rows, 1024) if head else frag.num_rows)
        table = ds.with_format("arrow")[frag.row_start : stop]
        return table.select(columns) if columns else table
    fs, _ = _fs(section, storage)
    if section.format == "jsonl":
        span = jsonl.Span(frag.row_start, frag.num_rows, frag.byte_offset, frag.first_line)
        table = jsonl.read_span(fs, frag.source, span, frag.schema, limit=1024 if head else None)
        return table.select(columns) if columns else table
    if head:
        columns = prompt_columns(section)
    groups = list(frag.row_groups[:1] if head else frag.row_groups)
    try:
        with fs.open(frag.source, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_groups(groups, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"input file {frag.label!r}: rows {frag.row_start}-{frag.row_start + frag.num_rows - 1} "
                         f"cannot be read ({_brief(e)}); the file is damaged or changed while the job ran") from None
    if not head and table.num_rows != frag.num_rows:
        raise InputError(f"input file {frag.label!r} changed while the job ran: rows {frag.row_start}-"
                         f"{frag.row_start + frag.num_rows - 1} now hold {table.num_rows} rows")
    return table
