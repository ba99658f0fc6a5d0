"""Demo-only code: what ``make demo``, the tests and the benchmarks draw and report, not the product.

    python -m demo.samples data/demo/photos                  # photos, scenes, edge cases (samples.py)
    python -m demo.samples circles data/circles --count 800  # the fill task's raw circles (circles.py)
    python -m demo.tiny_base --output models/tiny-circles    # the shipped tiny base's recipe
    python -m demo.report runs/demo                          # the demo's report of a run

demo/ may import the product (pipeline/, manifests/, train/, ...); no product package imports demo/
(``tests/test_demo_package.py`` checks it), so the product installs and runs without it.
"""
