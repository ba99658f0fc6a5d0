"""Manifest format v1: Parquet shards of (image, caption, condition maps) plus ``_manifest.json``."""

from manifests.duplicates import hf_dataset
from manifests.io import read, read_manifest_json
from manifests.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "hf_dataset", "read", "read_manifest_json"]
