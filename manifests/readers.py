"""Reading a manifest's rows: ``read`` (pandas), ``hf_dataset`` (a Hugging Face ``datasets.Dataset``) and the
duplicate filter both apply (ok rows, the ids of ``_duplicates/duplicates.parquet`` left out, by default).

The public read layer: it builds on ``manifests/io.py`` (shards, ``_manifest.json``) and
``manifests/duplicates.py`` (the side table), neither of which imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests.duplicates import duplicate_ids
from manifests.io import list_shards, read_manifest_json, resolve
from manifests.schema import PANDAS_INT_DTYPES, STATUSES

if TYPE_CHECKING:
    import pandas as pd


def duplicates_option(duplicates: str | bool) -> bool:
    """True when ``duplicates`` asks to skip them: ``"skip"`` or False skip, ``"keep"`` or True keep."""
    if isinstance(duplicates, bool):
        return not duplicates
    if duplicates not in ("skip", "keep"):
        raise ValueError(f"duplicates must be 'skip', 'keep' or a bool (True keeps them), not {duplicates!r}")
    return duplicates == "skip"


def keep_mask(ids: pa.Array | pa.ChunkedArray, skip: pa.Array | None) -> np.ndarray:
    """True for each of ``ids`` that is not in ``skip`` (all True when ``skip`` is None)."""
    if skip is None or len(skip) == 0:
        return np.ones(len(ids), bool)
    return ~pc.is_in(ids, value_set=skip).to_numpy(zero_copy_only=False)


def shards_schema(shards: Sequence[str], fs: pafs.FileSystem) -> pa.Schema:
    """The columns of every shard together: a manifest resumed by a newer release holds shards of an older
    minor version too (v1.1 shards lack ``caption_original_length``), whose rows read as null there. The
    shard with the most columns comes first, so its key-value metadata (the image features) is kept."""
    schemas = [pq.read_schema(s, filesystem=fs) for s in shards]
    schemas.sort(key=lambda schema: -len(schema))
    return pa.unify_schemas(schemas)


def hf_dataset(manifest_path: str, duplicates: str | bool = "skip", status: str | None = "ok", **load_kwargs: Any):
    """The manifest as a Hugging Face ``datasets.Dataset`` (image columns decode to PIL images), with
    ``manifests.read``'s defaults: ok rows only, duplicates left out (``duplicates="keep"`` or True keeps
    them; ``status=None`` keeps every status). ``load_kwargs`` go to ``datasets.load_dataset`` (e.g.
    ``cache_dir``). The rows are selected by index on top of the shards, nothing is copied.

    ``datasets.load_dataset("parquet", data_files="<manifest>/*.parquet")`` alone reads every row."""
    import datasets

    skip = duplicate_ids(manifest_path) if duplicates_option(duplicates) else None
    fs, base = resolve(manifest_path)
    shards = list_shards(manifest_path)
    scheme = manifest_path.split("://", 1)[0] + "://" if "://" in manifest_path else ""
    if shards and "features" not in load_kwargs:  # one set of columns for shards of several schema versions
        load_kwargs["features"] = datasets.Features.from_arrow_schema(shards_schema(shards, fs))
    ds = datasets.load_dataset("parquet", data_files=[scheme + s for s in shards], split="train", **load_kwargs)
    if status is None and (skip is None or len(skip) == 0):
        return ds
    keys = pa.concat_tables([pq.read_table(s, columns=["id", "status"], filesystem=fs) for s in shards])
    if keys.num_rows != len(ds):
        raise RuntimeError(f"datasets read {len(ds)} rows from {manifest_path}, its shards hold {keys.num_rows}")
    keep = keep_mask(keys["id"], skip)
    if status is not None:
        keep &= pc.equal(keys["status"], status).to_numpy(zero_copy_only=False)
    return ds.select(np.flatnonzero(keep))


def _read_shard(shard: str, columns: list[str] | None, fs: pafs.FileSystem) -> pa.Table:
    """A shard's ``columns`` (all when None), leaving out those it lacks: a shard written before v1.1 has
    no ``caption_source`` or ``phash``, and a manifest may mix both kinds."""
    if columns is not None:
        names = set(pq.read_schema(shard, filesystem=fs).names)
        columns = [c for c in columns if c in names]
    return pq.read_table(shard, columns=columns, filesystem=fs)


def _nullable_ints(arrow_type: pa.DataType) -> "pd.api.extensions.ExtensionDtype | None":
    """pandas' nullable integer for the integer columns (``width`` of an error row is null: numpy's int would
    become float64, and 64-bit ``phash`` values would round); None leaves other types to pyarrow. Shards carry
    the same in their pandas metadata (``schema.PANDAS_INT_DTYPES``); this covers shards written before."""
    import pandas as pd

    name = PANDAS_INT_DTYPES.get(arrow_type)
    return pd.api.types.pandas_dtype(name) if name else None


def read(
    path: str,
    columns: Iterable[str] | None = None,
    status: str | None = "ok",
    duplicates: str | bool = "skip",
) -> "pd.DataFrame":
    """Read a manifest into pandas, rows in shard order.

    ``status`` keeps only rows with that status (``None`` keeps all); ``columns`` limits what is
    read, which matters because image columns dominate the size. ``duplicates``: ``"skip"`` (the
    default; or False) leaves out the rows ``_duplicates/duplicates.parquet`` lists as exact or near duplicates
    of an earlier row, ``"keep"`` (or True) keeps them; a manifest without that table has none. Integer
    columns read as pandas' nullable ``Int32``/``Int64`` (``<NA>`` where an error row has no size).
    """
    import pandas as pd

    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES} or None, not {status!r}")
    skip = duplicates_option(duplicates)
    read_manifest_json(path)  # fails clearly on a folder that is not a (finished) manifest
    fs, base = resolve(path)
    shards = list_shards(path)
    skip_ids = duplicate_ids(path) if skip else None
    extra = ["status", *(["id"] if skip_ids is not None else [])]
    cols = None if columns is None else list(dict.fromkeys([*columns, *extra]))
    tables = [_read_shard(s, cols, fs) for s in shards]
    if not tables:
        return pd.DataFrame(columns=cols or [])
    table = pa.concat_tables(tables, promote_options="default")  # v1.0 shards: v1.1 columns read as nulls
    unknown = [c for c in cols or [] if c not in table.column_names]
    if unknown:  # in no shard at all: a typo, not an older shard
        raise KeyError(f"{path} has no column {', '.join(map(repr, unknown))}; it has {', '.join(table.column_names)}")
    if status is not None:
        table = table.filter(pc.equal(table["status"], status))
    if skip_ids is not None and len(skip_ids):
        table = table.filter(keep_mask(table["id"], skip_ids))
    frame = table.to_pandas(types_mapper=_nullable_ints)
    if columns is not None:
        frame = frame[list(dict.fromkeys(columns))]
    return frame
