"""Manifest format v1: Parquet shards of (image, caption, condition maps) plus ``_manifest.json``."""

from manifests.io import read_manifest_json
from manifests.readers import hf_dataset, read
from manifests.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "hf_dataset", "read", "read_manifest_json"]
