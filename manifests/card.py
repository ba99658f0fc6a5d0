"""The manifest's dataset card: ``.huggingface.yaml``, so ``datasets.load_dataset(<manifest>)`` reads its rows alone.

Why a card. Given a folder and nothing else, ``datasets`` (5.2, ``load.py``
``LocalDatasetModuleFactory.get_module`` -> ``data_files.get_data_patterns``) takes every data file under
it, sub-folders included; only names starting with "." or "__" are left out
(``data_files._is_unrequested_hidden_file_or_is_inside_unrequested_hidden_dir``,
``_is_inside_unrequested_special_dir``). So ``_duplicates/duplicates.parquet`` was read as data and the
shards failed to cast to its columns. When the card data holds ``configs`` with ``data_files``,
``get_module`` resolves those patterns instead, and ``load_dataset_builder`` hands the card's
``dataset_info`` for that config to the builder as its ``info``, whose features the Parquet builder casts
every table to (``packaged_modules/parquet/parquet.py`` ``_cast_table``): image columns decode to PIL.

Why ``.huggingface.yaml`` and not a ``README.md`` header. ``get_module`` merges the standalone YAML file
``config.REPOYAML_FILENAME`` (``.huggingface.yaml``, datasets >= 2.17, huggingface/datasets#6557; the Hub
reads it too) into the card data exactly as a README's YAML header. A ``README.md`` would break
``pd.read_parquet(<manifest>)``: pyarrow reads every file of a folder whose name does not start with
"_" or "." as Parquet ("Parquet magic bytes not found").

The card is written when the manifest is finalised (before ``_manifest.json``), from the columns the
shards were written with, so a rerun with other annotators (``--overwrite``) rewrites it. Its first line
marks it as this project's, so an output holding a ``.huggingface.yaml`` of someone else is refused.
"""

from __future__ import annotations

import json

import pyarrow as pa

from manifests.io import Location, join, resolve, write_bytes
from manifests.schema import IMAGE_STRUCT, SHARD_PREFIX, SHARD_SUFFIX, STATUS_OK

CARD_FILE = ".huggingface.yaml"
#: First line of every card this project writes (how the output checks tell ours from a user's).
CARD_MARKER = "# controlforge manifest card: written by pipeline/annotate.py, rewritten on every run"
#: The shards, and nothing else, as the ``train`` split (temporary files start with ".tmp-").
SHARD_PATTERN = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"
#: The card's configs: name -> Parquet builder filters (``datasets`` >= 3.2, ``ParquetConfig.filters``,
#: pyarrow DNF). The default is what training reads: ok rows, so every image decodes (diffusers'
#: ``train_controlnet.py`` calls ``.convert("RGB")`` on each, and error rows have none); ``all`` is every row.
#: Near duplicates stay in both: their ids live in ``_duplicates/`` and a card listing them would grow
#: with the manifest (``manifests.hf_dataset`` leaves them out).
CONFIGS: dict[str, list[list[str]] | None] = {"default": [["status", "==", STATUS_OK]], "all": None}


def feature_dtype(field: pa.Field) -> str:
    """The ``dtype`` of a column in a card's ``dataset_info.features`` (``datasets.Features._to_yaml_list``):
    ``image`` for the image structs, the Arrow type name (``string``, ``int32``...) for plain values."""
    if field.type == IMAGE_STRUCT:
        return "image"
    if pa.types.is_nested(field.type):  # the schema has none; a card cannot declare one by name
        raise ValueError(f"column {field.name!r} has nested type {field.type}, which a card cannot declare")
    return str(field.type)


def card_text(schema: pa.Schema) -> str:
    """The card for shards with ``schema``: per config (``CONFIGS``) the shards as the ``train`` split, and
    their columns as features.

    Block YAML with every value JSON-quoted (JSON is valid YAML flow style), so no YAML library is needed
    and no column name can break it."""
    q = json.dumps
    features = [line for field in schema
                for line in (f"    - name: {q(field.name)}", f"      dtype: {q(feature_dtype(field))}")]
    lines = [
        CARD_MARKER,
        "# datasets.load_dataset(<this folder>) reads the ok rows (the train split; image columns decode to PIL);",
        "# load_dataset(<this folder>, \"all\") every row. _manifest.json: provenance; _duplicates/: near duplicates.",
        "configs:",
    ]
    for name, filters in CONFIGS.items():
        lines += [f"- config_name: {q(name)}", "  data_files:", f"  - split: {q('train')}",
                  f"    path: {q(SHARD_PATTERN)}"]
        if filters is not None:
            lines.append(f"  filters: {q(filters)}")
    lines.append("dataset_info:")
    for name in CONFIGS:
        lines += [f"- config_name: {q(name)}", "  features:", *features]
    return "\n".join(lines) + "\n"


def is_our_card(text: bytes | str) -> bool:
    """True when ``text`` is a card this project wrote (its first line is the marker)."""
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return raw.split("\n", 1)[0].rstrip("\r") == CARD_MARKER


def write_card(out_dir: str | Location, schema: pa.Schema) -> str:
    """Write the card of the manifest at ``out_dir`` (atomically) for shards with ``schema``."""
    fs, base = resolve(out_dir)
    return write_bytes(fs, base, CARD_FILE, card_text(schema).encode())


def read_card(path: str) -> str | None:
    """The text of the manifest's ``.huggingface.yaml`` (anyone's), or None when there is none."""
    fs, base = resolve(path)
    try:
        with fs.open_input_stream(join(base, CARD_FILE)) as stream:
            return stream.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
