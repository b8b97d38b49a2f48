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
from dgbatch.config import ConfigError, InputSection, StorageSection
from dgbatch.planning import jsonl

# Columns dgbatch writes (generation, output filters, eval scores). An input column of the same name,
# e.g. from an earlier job whose output is this job's input, is carried under PREVIOUS_PREFIX.
OUTPUT_COLUMNS = (
    "id",
    "row_index",
    "sample_index",
    "output_text",
    "num_prompt_tokens",
    "num_output_tokens",
    "tokens_per_forward",
    "num_decoder_forwards",
    "finish_reason",
    "error",
    "filtered",
    "filter_reason",
    "score",
    "extracted",
)
PREVIOUS_PREFIX = "prev_"


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
class InputPlan:
    schema: pa.Schema
    fragments: list[Fragment]

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.fragments)


def _fs(section: InputSection, storage: StorageSection | None):
    from dgbatch.io.fs import filesystem

    return filesystem(section.path, storage)


def list_files(section: InputSection, storage: StorageSection | None) -> tuple[object, str, list[str]]:
    fs, path = _fs(section, storage)
    if any(c in path for c in "*?["):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
        root = path.split("*")[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if not any(part.startswith(("_", ".")) for part in p[len(path) :].split("/"))
        )
        root = path
    elif fs.exists(path):
        files, root = [path], path.rsplit("/", 1)[0]
    else:
        raise InputError(f"input.path {section.path!r} does not exist")
    if not files:
        raise InputError(f"input.path {section.path!r} matched no files")
    return fs, root, files


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
    """The input columns a row's prompt is built from."""
    key, value = section.prompt_source
    return sorted(template.columns(value)) if key == "input.template" else [value]


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
    named = {section.id_column: "input.id_column", section.reference_column: "input.reference_column",
             section.max_new_tokens_column: "input.max_new_tokens_column", **extra}
    for column, key in named.items():
        if column and column not in names:
            raise InputError(f"{where}: column {column!r} ({key}) not found; columns are {names}")
    budget = section.max_new_tokens_column
    if budget and not (pa.types.is_integer(schema.field(budget).type) or pa.types.is_null(schema.field(budget).type)):
        raise InputError(f"{where}: column {budget!r} (input.max_new_tokens_column) has type "
                         f"{schema.field(budget).type}, expected integers")


def inspect_input(section: InputSection, storage: StorageSection | None, fragment_rows: int,
                  extra: Mapping[str, str] = {}) -> InputPlan:
    """Read only metadata (Parquet footers / dataset info; JSON Lines: one streaming pass): cheap
    enough, and it fails before the model loads. `extra` as in `check_schema`."""
    if section.format == "datasets":
        return _inspect_datasets(section, fragment_rows, extra)
    if section.format == "jsonl":
        return _inspect_jsonl(section, storage, fragment_rows, extra)
    fs, root, files = list_files(section, storage)
    schema, fragments = None, []
    for path in files:
        rel = _relative(path, root)
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            hint = "; for JSON Lines set input.format=jsonl" if path.endswith((".jsonl", ".jsonl.gz", ".json")) else ""
            raise InputError(f"input file {rel!r} is not a readable Parquet file ({e}); input.format is "
                             f"parquet{hint}") from None
        check_schema(file_schema, section, f"input file {rel!r}", extra)
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise InputError(f"input file {rel!r} has a different schema from {fragments[0].label!r}: "
                             f"{file_schema} vs {schema}")
        groups, start, rows = [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= fragment_rows or g == meta.num_row_groups - 1:
                fragments.append(Fragment(len(fragments), path, rel, tuple(groups), start, rows))
                start, groups, rows = start + rows, [], 0
    return InputPlan(schema, fragments)


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") or path.rsplit("/", 1)[-1]


def _inspect_jsonl(section: InputSection, storage: StorageSection | None, fragment_rows: int,
                   extra: Mapping[str, str]) -> InputPlan:
    import gzip
    import zlib

    fs, root, files = list_files(section, storage)
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
    return InputPlan(schema, fragments)


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
    label = section.path.rstrip("/").rsplit("/", 1)[-1]
    frags = [Fragment(i, section.path, label, (), s, min(fragment_rows, n - s))
             for i, s in enumerate(range(0, n, fragment_rows))]
    return InputPlan(schema, frags)


def read_fragment(frag: Fragment, section: InputSection, storage: StorageSection | None,
                  head: bool = False) -> pa.Table:
    """The fragment's rows; with `head`, only the first ~1024 and the prompt's columns (for sampling).
    JSON Lines tables carry `jsonl.READ_ERROR`: each line's read error, or None."""
    if section.format == "datasets":
        ds = _load_dataset(section)  # memory-mapped; indexing honours any select/shuffle mapping
        stop = frag.row_start + (min(frag.num_rows, 1024) if head else frag.num_rows)
        return ds.with_format("arrow")[frag.row_start : stop]
    fs, _ = _fs(section, storage)
    if section.format == "jsonl":
        span = jsonl.Span(frag.row_start, frag.num_rows, frag.byte_offset, frag.first_line)
        return jsonl.read_span(fs, frag.source, span, frag.schema, limit=1024 if head else None)
    columns = prompt_columns(section) if head else None
    with fs.open(frag.source, "rb") as fh:
        return pq.ParquetFile(fh).read_row_groups(list(frag.row_groups[:1] if head else frag.row_groups),
                                                   columns=columns)
