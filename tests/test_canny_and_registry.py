"""Canny annotator and the registry: names, parameters, plugins, provenance."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

from annotators import registry
from annotators.canny import CannyAnnotator, CannyParams


def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:256, :320])


def test_canny_map_is_binary_and_aligned():
    img = photo()
    (edges,) = CannyAnnotator().annotate([img], ["id0"])
    assert edges.dtype == np.uint8 and edges.shape == img.shape[:2]
    assert set(np.unique(edges)) == {0, 255}
    assert 0.01 < (edges > 0).mean() < 0.5


def test_batch_equals_single_calls():
    img = photo()
    imgs, ids = [img, img[::-1].copy(), img[:, ::-1].copy()], ["a", "b", "c"]
    annotator = CannyAnnotator(CannyParams(random_thresholds=True))
    batch = annotator.annotate(imgs, ids)
    for one, image, i in zip(batch, imgs, ids):
        assert np.array_equal(one, annotator.annotate([image], [i])[0])


def test_random_thresholds_are_seeded_per_image():
    a = CannyAnnotator(CannyParams(random_thresholds=True, seed=1))
    b = CannyAnnotator(CannyParams(random_thresholds=True, seed=1))
    draws = [a.thresholds(f"id{i}") for i in range(20)]
    assert draws == [b.thresholds(f"id{i}") for i in range(20)]
    assert len(set(draws)) > 10
    assert all(50 <= lo <= 150 and lo < hi <= 250 for lo, hi in draws)
    assert CannyAnnotator().thresholds("anything") == (100, 200)


def test_bad_parameters_fail_with_the_field_name():
    with pytest.raises(ValueError, match="canny.low=300 must not exceed canny.high=200"):
        CannyParams(low=300)
    with pytest.raises(ValueError, match="no parameter 'lo'.*low, high"):
        registry.parse_params(CannyAnnotator, {"lo": "5"})
    with pytest.raises(ValueError, match="canny.low: cannot read 'x' as int"):
        registry.parse_params(CannyAnnotator, {"low": "x"})


def test_cli_strings_are_coerced_to_field_types():
    params = registry.parse_params(CannyAnnotator, {"low": "50", "random_thresholds": "true"})
    assert params.low == 50 and params.random_thresholds is True


def test_unknown_annotator_lists_known_names():
    with pytest.raises(registry.UnknownAnnotatorError, match="unknown annotator 'sobel'; known: .*canny"):
        registry.get("sobel")


def test_provenance_records_class_versions_and_params():
    prov = registry.create("canny", {"low": "60"}).provenance()
    assert prov["class"] == "annotators.canny.CannyAnnotator"
    assert prov["params"]["low"] == 60
    assert prov["versions"]["opencv"]


def test_entry_point_plugins_are_discovered(monkeypatch):
    ep = metadata.EntryPoint(name="fake_edges", value="tests.plugins:InvertAnnotator", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"fake_edges": ep})
    assert "fake_edges" in registry.available()
    cls = registry.get("fake_edges")
    assert cls.__name__ == "InvertAnnotator"
    out = cls().annotate([np.zeros((8, 8, 3), np.uint8)], ["x"])
    assert (out[0] == 255).all()
