"""Gateway request and response bodies: rows in (JSON or CSV), predictions out.

For: turning a request body into a finite float64 matrix, with errors that name the row and
column (never the value: an input may be personal data and error messages are logged), and
rendering predictions in the caller's format.

Request shapes (the only ones accepted):

* ``application/json``: ``{"rows": [[x11, x12, ...], [x21, ...], ...]}``: numbers only (no
  strings, booleans, nulls, ``NaN`` or ``Infinity``), every row the same length.
* ``text/csv``: one row per line, comma-separated numbers; an optional header line (a first line
  none of whose cells is a number); blank lines are skipped.

Responses: JSON ``{"outputs": [[y11, ...], ...], "version": v, "units": n}`` (float64, shortest
round-trip text), or CSV with a header ``y0,y1,...`` and one line per row.

Not for: the model's input width or the contract's batch limit (checked by the gateway service
and the contract policy).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from marketplace.errors import Invalid, UnsupportedMediaType

__all__ = ["CSV", "JSON", "media_type_of", "parse_rows", "render"]

JSON = "application/json"
CSV = "text/csv"


def media_type_of(content_type: str | None) -> str:
    """``application/json`` or ``text/csv`` from a Content-Type header, else 415."""
    base = (content_type or JSON).split(";")[0].strip().lower()
    if base in (JSON, "application/*+json"):
        return JSON
    if base in (CSV, "application/csv"):
        return CSV
    raise UnsupportedMediaType(
        f'send rows as application/json ({{"rows": [[...], ...]}}) or text/csv, not {base or "nothing"}'
    )


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def _parse_json(body: bytes, max_rows: int) -> np.ndarray:
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except _NonFinite:
        raise Invalid("the body is not valid JSON: NaN and Infinity are not numbers") from None
    except json.JSONDecodeError as e:
        raise Invalid(f"the body is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise Invalid("the body is not valid JSON: a number could not be read") from None
    except RecursionError:
        raise Invalid("the body is nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"rows"}:
        raise Invalid('expected a JSON object with exactly one key, "rows": {"rows": [[...], ...]}')
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise Invalid('"rows" must be a non-empty list of rows (lists of numbers)')
    if len(rows) > max_rows:
        raise Invalid(f"{len(rows)} rows exceed the gateway's limit of {max_rows} per request")
    width = -1
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise Invalid(f"rows[{i}]: expected a non-empty list of numbers")
        if width < 0:
            width = len(row)
        elif len(row) != width:
            raise Invalid(f"rows[{i}]: has {len(row)} columns, rows[0] has {width}")
        for j, v in enumerate(row):
            if type(v) not in (int, float):
                raise Invalid(f"rows[{i}][{j}]: expected a number, got {type(v).__name__}")
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except OverflowError:
        arr = None
    if arr is None or not np.all(np.isfinite(arr)):
        bad = _first_non_finite(rows)
        raise Invalid(f"rows[{bad[0]}][{bad[1]}]: not a finite float64 number")
    return arr


def _first_non_finite(rows: list[list[Any]]) -> tuple[int, int]:
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            try:
                if not math.isfinite(float(v)):
                    return i, j
            except OverflowError:
                return i, j
    return 0, 0  # pragma: no cover - called only when one exists


def _cell(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_csv(body: bytes, max_rows: int) -> np.ndarray:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Invalid(f"the CSV is not UTF-8 (byte {e.start})") from None
    if "\x00" in text:
        raise Invalid("the CSV contains a NUL byte")
    out: list[list[float]] = []
    width = -1
    try:
        for lineno, cells in enumerate(csv.reader(io.StringIO(text, newline=""), strict=True), start=1):
            if not cells or all(not c.strip() for c in cells):
                continue
            values = [_cell(c.strip()) for c in cells]
            if not out and width < 0 and all(v is None for v in values):
                width = len(cells)  # a header line: fixes the width, carries no data
                continue
            if width < 0:
                width = len(cells)
            if len(cells) != width:
                raise Invalid(f"line {lineno}: has {len(cells)} columns, expected {width}")
            for j, v in enumerate(values):
                if v is None:
                    raise Invalid(f"line {lineno}, column {j + 1}: not a number")
                if not math.isfinite(v):
                    raise Invalid(f"line {lineno}, column {j + 1}: not a finite number")
            out.append(values)  # type: ignore[arg-type]
            if len(out) > max_rows:
                raise Invalid(f"more than {max_rows} rows: the gateway's limit per request")
    except csv.Error as e:
        raise Invalid(f"malformed CSV: {e}") from None
    if not out:
        raise Invalid("the CSV has no rows")
    return np.asarray(out, dtype=np.float64)


def parse_rows(body: bytes, media_type: str, *, max_rows: int) -> np.ndarray:
    """The rows of ``body`` as a finite (n, d) float64 matrix. Raises Invalid (422)."""
    if not body:
        raise Invalid("empty body: send rows as JSON or CSV")
    if media_type == CSV:
        return _parse_csv(body, max_rows)
    return _parse_json(body, max_rows)


def render(outputs: np.ndarray, media_type: str, *, version: int | None, units: int) -> bytes:
    """The response body for ``outputs`` (n, k)."""
    if media_type == CSV:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([f"y{j}" for j in range(outputs.shape[1])])
        w.writerows([repr(float(v)) for v in row] for row in outputs)
        return buf.getvalue().encode()
    doc = {"outputs": outputs.tolist(), "version": version, "units": units}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
