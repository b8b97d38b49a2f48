"""The job's input: find it, check it before anything heavy loads, and cut it into fragments.

A fragment is a deterministic slice of the input (a file's row groups, or a row range of a
`datasets` dataset) that one planning task tokenizes. Fragments are listed in a fixed order, so
the same input always yields the same fragments, shards and default row ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from dgbatch.config import ConfigError, InputSection, StorageSection

# Columns dgbatch writes; an input column of the same name would be silently shadowed.
OUTPUT_COLUMNS = (
    "id",
    "output_text",
    "num_prompt_tokens",
    "num_output_tokens",
    "tokens_per_forward",
    "num_decoder_forwards",
    "finish_reason",
    "error",
)


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


def list_parquet_files(section: InputSection, storage: StorageSection | None) -> tuple[object, str, list[str]]:
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


def check_schema(schema: pa.Schema, section: InputSection, where: str) -> None:
    names = schema.names
    col = section.prompt_column or section.messages_column
    key = "input.prompt_column" if section.prompt_column else "input.messages_column"
    if col not in names:
        raise InputError(f"{where}: column {col!r} ({key}) not found; columns are {names}")
    typ = schema.field(col).type
    if section.prompt_column:
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                or pa.types.is_large_binary(typ) or pa.types.is_string_view(typ)):
            hint = "; for chat messages set input.messages_column" if pa.types.is_list(typ) else ""
            raise InputError(f"{where}: column {col!r} has type {typ}, expected string{hint}")
    else:
        ok = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type)
        if not ok or not {"role", "content"} <= {f.name for f in typ.value_type}:
            raise InputError(
                f"{where}: column {col!r} has type {typ}, expected list<struct<role: string, content: string>>"
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
    if section.id_column and section.id_column not in names:
        raise InputError(f"{where}: id column {section.id_column!r} (input.id_column) not found; columns are {names}")
    clash = [c for c in names if c in OUTPUT_COLUMNS and c != section.id_column]
    if clash:
        raise InputError(
            f"{where}: input columns {clash} collide with dgbatch's output columns; rename them "
            f"(or, for 'id', set input.id_column=id)"
        )


def inspect_input(section: InputSection, storage: StorageSection | None, fragment_rows: int) -> InputPlan:
    """Read only metadata (Parquet footers / dataset info): cheap, and it fails before the model loads."""
    if section.format == "datasets":
        return _inspect_datasets(section, fragment_rows)
    fs, root, files = list_parquet_files(section, storage)
    schema, fragments = None, []
    for path in files:
        rel = path[len(root) :].lstrip("/") or path.rsplit("/", 1)[-1]
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"input file {rel!r} is not a readable Parquet file ({e}); input.format is parquet") from None
        check_schema(file_schema, section, f"input file {rel!r}")
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


def _inspect_datasets(section: InputSection, fragment_rows: int) -> InputPlan:
    ds = _load_dataset(section)
    schema = ds.features.arrow_schema
    check_schema(schema, section, f"dataset {section.path!r}")
    n = len(ds)
    label = section.path.rstrip("/").rsplit("/", 1)[-1]
    frags = [Fragment(i, section.path, label, (), s, min(fragment_rows, n - s))
             for i, s in enumerate(range(0, n, fragment_rows))]
    return InputPlan(schema, frags)


def read_fragment(frag: Fragment, section: InputSection, storage: StorageSection | None,
                  head: bool = False) -> pa.Table:
    """The fragment's rows; with `head`, only its first row group's prompt column (for sampling)."""
    if section.format == "datasets":
        ds = _load_dataset(section)  # memory-mapped; indexing honours any select/shuffle mapping
        stop = frag.row_start + (min(frag.num_rows, 1024) if head else frag.num_rows)
        return ds.with_format("arrow")[frag.row_start : stop]
    fs, _ = _fs(section, storage)
    columns = [section.prompt_column or section.messages_column] if head else None
    if head and section.image_column:
        columns.append(section.image_column)
    with fs.open(frag.source, "rb") as fh:
        return pq.ParquetFile(fh).read_row_groups(list(frag.row_groups[:1] if head else frag.row_groups),
                                                   columns=columns)
