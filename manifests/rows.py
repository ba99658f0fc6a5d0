"""The row shape of a manifest: every input file is one row, and a failure is recorded in it."""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

from manifests.schema import COND_PREFIX, STATUS_ERROR, STATUS_OK, cond_column


def empty_row(row_id: str, source: str, annotator_names: Sequence[str]) -> dict[str, Any]:
    """A row with only its keys set: status ok until something fails."""
    row: dict[str, Any] = {
        "id": row_id, "source": source, "caption": "", "image": None, "width": None, "height": None,
        "status": STATUS_OK, "error": None, "source_sha256": None, "orig_width": None, "orig_height": None,
        "caption_source": "", "phash": None, "caption_original_length": None,
    }
    row.update({cond_column(n): None for n in annotator_names})
    return row


def mark(row: dict[str, Any], status: str, reason: str) -> None:
    """Record a failure: the row keeps its provenance but drops half-made images."""
    row["status"] = status
    row["error"] = reason
    row["image"] = None
    row["width"] = row["height"] = None
    row["phash"] = None  # a hash only for rows a reader keeps
    for key in row:
        if key.startswith(COND_PREFIX):
            row[key] = None


def storable_rows(rows: Sequence[dict[str, Any]], schema: pa.Schema, error: BaseException) -> list[dict[str, Any]]:
    """``rows`` with each row Arrow cannot store under ``schema`` (a string that is not valid UTF-8, a
    value of the wrong type) turned into an error row ``write: <reason>`` that keeps only its id and
    source; raises ``error`` again when every row is storable (the failure was not one row's)."""
    out: list[dict[str, Any]] = []
    failed = False
    for row in rows:
        try:
            pa.Table.from_pylist([row], schema=schema)
            out.append(row)
            continue
        except (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError) as exc:
            reason = " ".join(f"write: {type(exc).__name__}: {exc}".split())
        failed = True
        bare = {key: None for key in row}
        bare.update(id=row["id"], source=_text(row["source"]), caption="", caption_source="",
                    status=STATUS_ERROR, error=_text(reason))
        out.append(bare)
    if not failed:
        raise error
    return out


def _text(value: str) -> str:
    """``value`` as valid UTF-8 text (anything unencodable as ``\\x``/``\\u`` escapes)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_kind(reason: str) -> str:
    """The part of a row's ``error`` that groups it in summaries: the stage before the first colon."""
    return reason.split(":")[0]
