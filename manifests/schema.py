"""Manifest schema v1: the one contract between annotation and training.

A manifest is a folder of Parquet shards plus ``_manifest.json``. Every input file is one row,
failures included. Image-like columns are ``struct<bytes, path>`` so Hugging Face ``datasets``
decodes them as PIL images (declared through the ``huggingface`` schema metadata key).
"""

from __future__ import annotations

import json
from typing import Iterable

import pyarrow as pa

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = frozenset({1})
#: Additive changes within v1: 1 adds ``caption_source`` and ``phash`` (readers of v1.0 manifests,
#: which lack them, treat them as absent); 2 adds ``caption_original_length``.
SCHEMA_MINOR = 2

MANIFEST_JSON = "_manifest.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
#: Digits of a new shard's index: names sort in index order up to 999,999 shards (manifests written
#: with 5 digits keep them when resumed; readers order shards by number, not by name).
SHARD_DIGITS = 6
#: Sub-folder of per-shard stats files (counts, error reasons, fingerprint). A leading underscore:
#: pandas/pyarrow and ``datasets`` skip it when they read the folder as Parquet.
STATS_DIR = "_stats"
COND_PREFIX = "cond_"

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_FILTERED = "filtered"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_FILTERED)

# Key in each shard's Parquet key-value metadata holding the job's provenance (JSON).
PROVENANCE_KEY = b"controlforge"

IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("image", IMAGE_STRUCT),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
)
TAIL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("orig_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
)
#: Columns added in v1.1; older shards lack them.
V1_1_FIELDS: tuple[pa.Field, ...] = (
    pa.field("caption_source", pa.string()),
    pa.field("phash", pa.int64()),
)
#: Columns added in v1.2; older shards lack them (readers see nulls: no caption was cut).
V1_2_FIELDS: tuple[pa.Field, ...] = (
    # The caption's length in characters before it was cut to ``--max-caption-chars``; null when whole.
    pa.field("caption_original_length", pa.int64()),
)
#: Where a row's caption came from (``caption_source``); a captioner's name otherwise, "" for none.
CAPTION_SOURCES = ("sidecar", "metadata", "list")


def cond_column(annotator_name: str) -> str:
    """Column name holding the condition map made by ``annotator_name``."""
    return f"{COND_PREFIX}{annotator_name}"


def image_columns(schema: pa.Schema) -> list[str]:
    """The ``struct<bytes, path>`` columns: ``image`` and every ``cond_*``."""
    return [f.name for f in schema if f.type == IMAGE_STRUCT]


def cond_columns(names: Iterable[str]) -> list[str]:
    """The ``cond_*`` columns among ``names``, in order."""
    return [n for n in names if n.startswith(COND_PREFIX)]


def _hf_features(schema: pa.Schema) -> dict:
    """The ``datasets.Features`` dict for ``schema``: image structs become ``Image``."""
    features = {}
    for field in schema:
        if field.type == IMAGE_STRUCT:
            features[field.name] = {"_type": "Image"}
        else:
            features[field.name] = {"dtype": str(field.type), "_type": "Value"}
    return features


#: pandas dtype of each integer Arrow type: pandas' nullable integers, so a column with nulls (error rows have
#: no ``width``) stays integer instead of becoming float64.
PANDAS_INT_DTYPES = {pa.int32(): "Int32", pa.int64(): "Int64"}


def _pandas_metadata(schema: pa.Schema) -> dict:
    """pandas' schema metadata (the ``pandas`` key pyarrow writes for a DataFrame), naming only the integer
    columns, as nullable integers: pyarrow's ``to_pandas`` builds a column as the extension dtype its
    ``numpy_type`` names (``pandas_compat._get_extension_dtypes``), so ``pd.read_parquet(<manifest>)`` keeps
    ``width``/``height`` int with ``<NA>`` on error rows and ``phash`` exact. Other columns convert as usual."""
    columns = [{"name": f.name, "field_name": f.name, "pandas_type": str(f.type),
                "numpy_type": PANDAS_INT_DTYPES[f.type], "metadata": None}
               for f in schema if f.type in PANDAS_INT_DTYPES]
    return {"index_columns": [], "column_indexes": [], "columns": columns, "creator": {"library": "controlforge"}}


def manifest_schema(annotator_names: Iterable[str], provenance: dict | None = None) -> pa.Schema:
    """The Arrow schema of a shard with one ``cond_<name>`` column per annotator.

    ``provenance`` (job settings, annotators, versions) is stored in the schema metadata so
    every shard describes itself even without ``_manifest.json``.
    """
    cond = [pa.field(cond_column(n), IMAGE_STRUCT) for n in annotator_names]
    schema = pa.schema([*BASE_FIELDS, *cond, *TAIL_FIELDS, *V1_1_FIELDS, *V1_2_FIELDS])
    metadata = {b"huggingface": json.dumps({"info": {"features": _hf_features(schema)}}),
                b"pandas": json.dumps(_pandas_metadata(schema))}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return schema.with_metadata(metadata)


def shard_name(index: int, digits: int = SHARD_DIGITS) -> str:
    """File name of shard ``index`` (``part-000000.parquet``)."""
    return f"{SHARD_PREFIX}{index:0{digits}d}{SHARD_SUFFIX}"


def shard_index(name: str) -> int | None:
    """The index in a shard's file name, or None when the name is not a shard's."""
    digits = name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)] if is_shard_name(name) else ""
    return int(digits) if digits.isdigit() else None


def is_shard_name(name: str) -> bool:
    """True for a complete shard's file name (temporary files never match)."""
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)
