"""The row shape of a manifest: every input file is one row, and a failure is recorded in it."""

from __future__ import annotations

from typing import Any, Sequence

from manifests.schema import COND_PREFIX, STATUS_OK, cond_column


def empty_row(row_id: str, source: str, annotator_names: Sequence[str]) -> dict[str, Any]:
    """A row with only its keys set: status ok until something fails."""
    row: dict[str, Any] = {
        "id": row_id, "source": source, "caption": "", "image": None, "width": None, "height": None,
        "status": STATUS_OK, "error": None, "source_sha256": None, "orig_width": None, "orig_height": None,
        "caption_source": "", "phash": None,
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


def error_kind(reason: str) -> str:
    """The part of a row's ``error`` that groups it in summaries: the stage before the first colon."""
    return reason.split(":")[0]
