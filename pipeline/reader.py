"""List the input collection: one item per image file, sorted, with where its caption comes from.

Captions come from a sidecar with the image's stem (``.txt``, ``.caption``, or ``.json`` with a
``caption``/``text`` field), else from a ``metadata.jsonl``/``.csv``/``.parquet`` listing
``file_name`` and ``text`` (the Hugging Face imagefolder convention; ``file_name`` is relative to
the metadata file's folder), else "". Sidecars are read by the workers, metadata files here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath

import pyarrow.fs as pafs

from manifests.io import join, resolve

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json")  # first found wins
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_FIELDS = ("text", "caption")


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image file of the collection."""

    id: str
    """Stable key: hash of ``source``."""
    source: str
    """Path relative to the input root, '/'-separated."""
    sidecar: str | None = None
    """Relative path of the caption sidecar, read by the worker."""
    caption: str | None = None
    """Caption from a metadata file, when there is one for this file."""


@dataclasses.dataclass
class InputListing:
    """The sorted image items under an input root, and what was not an image."""

    root: str
    items: list[InputItem]
    ignored: int
    """Files that are neither images, sidecars nor metadata (not rows of the manifest)."""


def row_id(source: str) -> str:
    """The manifest id of a relative source path."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def list_inputs(root: str) -> InputListing:
    """All image files under ``root`` (recursive), sorted by relative path."""
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a folder"
        raise FileNotFoundError(f"--input {root} {what}; give a folder or bucket prefix of images")
    files = [
        f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if f.type == pafs.FileType.File
    ]
    rel = sorted(posixpath.relpath(p, base) for p in files)
    present = set(rel)
    metadata_captions = _metadata_captions(fs, base, [r for r in rel if posixpath.basename(r) in METADATA_NAMES])
    items, ignored = [], 0
    for source in rel:
        stem, ext = posixpath.splitext(source)
        if ext.lower() not in IMAGE_EXTENSIONS:
            is_sidecar = ext.lower() in SIDECAR_EXTENSIONS or posixpath.basename(source) in METADATA_NAMES
            ignored += 0 if is_sidecar else 1
            continue
        sidecar = next((stem + e for e in SIDECAR_EXTENSIONS if stem + e in present), None)
        items.append(InputItem(row_id(source), source, sidecar, metadata_captions.get(source)))
    return InputListing(root=root, items=items, ignored=ignored)


def _metadata_captions(fs: pafs.FileSystem, base: str, metadata_files: list[str]) -> dict[str, str]:
    """{relative image path: caption} from every metadata file in the tree."""
    import pandas as pd
    captions: dict[str, str] = {}
    for rel in metadata_files:
        with fs.open_input_file(join(base, rel)) as f:
            data = f.read()
        frame = _read_table(rel, data)
        field = next((c for c in CAPTION_FIELDS if c in frame.columns), None)
        if "file_name" not in frame.columns or field is None:
            raise ValueError(
                f"{rel}: a metadata file needs a 'file_name' column and a 'text' (or 'caption') "
                f"column; it has {list(frame.columns)}"
            )
        folder = posixpath.dirname(rel)
        for name, text in zip(frame["file_name"], frame[field]):
            key = posixpath.normpath(posixpath.join(folder, str(name)))
            captions[key] = "" if pd.isna(text) else str(text)
    return captions


def _read_table(name: str, data: bytes) -> "pd.DataFrame":
    import pandas as pd

    if name.endswith(".jsonl"):
        return pd.read_json(io.BytesIO(data), lines=True, dtype=False)
    if name.endswith(".csv"):
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    return pd.read_parquet(io.BytesIO(data))


def read_sidecar_caption(fs: pafs.FileSystem, base: str, sidecar: str) -> str:
    """The caption in a sidecar file; a ``.json`` sidecar holds it in ``caption`` or ``text``."""
    with fs.open_input_file(join(base, sidecar)) as f:
        text = f.read().decode("utf-8")
    if not sidecar.endswith(".json"):
        return text.strip()
    record = json.loads(text)
    for field in ("caption", "text"):
        if isinstance(record, dict) and isinstance(record.get(field), str):
            return record[field].strip()
    raise ValueError(f"{sidecar} has no string 'caption' or 'text' field")
