"""JSON Lines input: one JSON object per line, plain or gzip (`.gz`), on any fsspec filesystem.

Every non-blank line is one row, so rows out equal lines in: a line that is not a JSON object, or
whose values do not fit the column types, becomes that row's error record (its columns null).

Inspection reads each file once, streaming (O(chunk) memory), to count rows, cut fragments and infer
one Arrow schema for the whole input: the union of the keys, each column's type unified over all
lines (ints and floats become float64, nulls take the other lines' type). Fragments of a plain file
remember the byte offset of their first line, so a planning task seeks straight to it; a gzip file
cannot seek, so its planning tasks decompress from the start (split a big .gz input into files).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

CHUNK = 1024  # lines whose types are inferred together
READ_ERROR = "_dgb_read_error"  # internal column: why a line could not be read (None if it could)


@dataclass(frozen=True)
class Span:
    """Rows [row_start, row_start + num_rows) of a file: where they start (plain files) and their first line."""

    row_start: int
    num_rows: int
    byte_offset: int
    first_line: int


def _lines(fs, path: str, byte_offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) for each line from `byte_offset` (plain files) of a plain or .gz file."""
    with fs.open(path, "rb") as raw:
        fh = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        if byte_offset:
            fh.seek(byte_offset)
        pos = byte_offset
        for line in fh:
            yield pos, line
            pos += len(line)


def parse(line: bytes) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object (a JSON {type(obj).__name__})"
    return obj, None


def _merge(fields: dict[str, pa.DataType], schema: pa.Schema) -> None:
    """Unify `schema` into `fields` column by column; a column whose types cannot unify keeps the
    first type seen (the lines that do not fit become error rows when read)."""
    for f in schema:
        old = fields.get(f.name)
        if old is None or pa.types.is_null(old):
            fields[f.name] = f.type
            continue
        try:
            fields[f.name] = pa.unify_schemas([pa.schema([(f.name, old)]), pa.schema([f])],
                                              promote_options="permissive").field(0).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
            pass


def _infer(objs: list[dict], fields: dict[str, pa.DataType]) -> None:
    try:
        _merge(fields, pa.Table.from_struct_array(pa.array(objs)).schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):  # mixed types inside the chunk
        for obj in objs:
            try:
                _merge(fields, pa.Table.from_struct_array(pa.array([obj])).schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                pass


def inspect_file(fs, path: str, fragment_rows: int, fields: dict[str, pa.DataType]) -> tuple[list[Span], int]:
    """Stream the file once: (its fragments' spans, how many lines are JSON objects); its columns'
    types are unified into `fields`."""
    spans: list[Span] = []
    chunk: list[dict] = []
    rows = start_row = start_offset = start_line = objects = 0
    for lineno, (pos, line) in enumerate(_lines(fs, path), 1):
        if not line.strip():
            continue
        if rows - start_row == 0:
            start_offset, start_line = pos, lineno
        obj, _ = parse(line)
        objects += obj is not None
        if obj:
            chunk.append(obj)
        if len(chunk) == CHUNK:
            _infer(chunk, fields)
            chunk = []
        rows += 1
        if rows - start_row == fragment_rows:
            spans.append(Span(start_row, rows - start_row, start_offset, start_line))
            start_row = rows
    if chunk:
        _infer(chunk, fields)
    if rows > start_row:
        spans.append(Span(start_row, rows - start_row, start_offset, start_line))
    return spans, objects


def read_span(fs, path: str, span: Span, schema: pa.Schema, limit: int | None = None) -> pa.Table:
    """The span's rows (at most `limit`) as a table of `schema` plus READ_ERROR (a line's error, else None)."""
    gz = path.endswith(".gz")
    skip = span.row_start if gz else 0
    want = span.num_rows if limit is None else min(limit, span.num_rows)
    objs: list[dict] = []
    errors: list[str | None] = []
    linenos: list[int] = []
    lineno = 0 if gz else span.first_line - 1
    for _, line in _lines(fs, path, 0 if gz else span.byte_offset):
        lineno += 1
        if not line.strip():
            continue
        if skip:
            skip -= 1
            continue
        obj, err = parse(line)
        objs.append(obj or {})
        errors.append(None if err is None else f"input line {lineno}: {err}")
        linenos.append(lineno)
        if len(objs) == want:
            break
    table = _to_table(objs, errors, schema, linenos)
    return table.append_column(READ_ERROR, pa.array(errors, pa.string()))


def _to_table(objs: list[dict], errors: list[str | None], schema: pa.Schema, linenos: list[int]) -> pa.Table:
    """`objs` as a table of `schema`; a row whose values do not fit becomes null with an error."""
    typ = pa.struct(list(schema))
    try:
        return pa.Table.from_struct_array(pa.array(objs, type=typ))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        pass
    for i, obj in enumerate(objs):
        try:
            pa.array([obj], type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            objs[i] = {}
            errors[i] = errors[i] or f"input line {linenos[i]}: a value does not fit its column's type ({e})"
    return pa.Table.from_struct_array(pa.array(objs, type=typ))
