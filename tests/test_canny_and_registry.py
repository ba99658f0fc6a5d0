"""Canny annotator and the registry: names, parameters, plugins, provenance."""

from __future__ import annotations

import importlib
import sys

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


PLUGIN_MODULE = "controlforge_test_plugin"
PLUGIN_SOURCE = """
from annotators.base import Annotator


class NegativeAnnotator(Annotator):
    name = "negative"

    def annotate(self, images, ids):
        return [255 - img[:, :, 0] for img in images]


def not_an_annotator():
    pass
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution installed the way pip leaves one: a module and its ``.dist-info`` folder
    (METADATA, entry_points.txt) in a folder on ``sys.path``."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "controlforge_test_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: controlforge-test-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n"
        f"negative = {PLUGIN_MODULE}:NegativeAnnotator\n"
        f"broken = {PLUGIN_MODULE}:not_an_annotator\n"
        "[some.other.group]\n"
        f"elsewhere = {PLUGIN_MODULE}:NegativeAnnotator\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # also clears importlib's finder caches
    yield tmp_path
    sys.modules.pop(PLUGIN_MODULE, None)
    importlib.invalidate_caches()  # drop the metadata finder's cache of the removed folder


def test_no_plugin_is_found_before_one_is_installed():
    assert "negative" not in registry.available()
    with pytest.raises(registry.UnknownAnnotatorError, match="unknown annotator 'negative'"):
        registry.get("negative")


def test_an_installed_entry_point_is_found_through_importlib_metadata(installed_plugin):
    assert {"negative", "broken"} <= set(registry.available())
    assert "elsewhere" not in registry.available()  # only the controlforge.annotators group counts
    cls = registry.get("negative")
    assert cls.__module__ == PLUGIN_MODULE and cls.__name__ == "NegativeAnnotator"
    annotator = registry.create("negative")
    assert annotator.provenance()["class"] == f"{PLUGIN_MODULE}.NegativeAnnotator"
    (out,) = annotator.annotate([np.full((8, 8, 3), 5, np.uint8)], ["x"])
    assert (out == 250).all()


def test_an_entry_point_that_is_not_an_annotator_is_refused(installed_plugin):
    with pytest.raises(TypeError, match="'broken' resolves to .*not an Annotator subclass"):
        registry.get("broken")
