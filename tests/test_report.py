"""demo/report.py: the demo's report from evaluate's metrics.json and the trainer's validation curve."""

from __future__ import annotations

import json

from PIL import Image


def test_report_tables_metrics_against_the_base_and_draws_the_curve(tmp_path):
    from demo.report import main

    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "eval").mkdir()
    Image.new("RGB", (96, 32)).save(run / "eval" / "grid.png")
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "controlnet": {"edge_f1": 0.7, "circle_iou": 0.81, "colour_accuracy": 0.9},
        "base": {"edge_f1": 0.7, "circle_iou": 0.25, "colour_accuracy": 0.95},
        "num_samples": 32, "condition": "canny", "task": "circle", "lower_is_better": [],
        "grid": "grid.png",
    }))
    curve = [{"step": s, "edge_f1": 0.1 * k, "circle_iou": 0.2 * k, "colour_accuracy": 0.9}
             for k, s in enumerate((200, 400, 600), start=1)] + [{"step": "final", "circle_iou": 0.8}]
    (run / "validation" / "metrics.jsonl").write_text("\n".join(json.dumps(c) for c in curve))
    (run / "train_summary.json").write_text(json.dumps({"figures": {"global_step": 600, "final_loss": 0.1}}))
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| circle_iou | 0.810 | 0.250 | ControlNet |" in report
    assert "| colour_accuracy | 0.900 | 0.950 | base |" in report
    assert "| edge_f1 | 0.700 | 0.700 | - |" in report
    assert "(eval/grid.png)" in report and "(metrics_curve.png)" in report and "trained 600 steps" in report
    assert Image.open(run / "metrics_curve.png").size[0] > 300


def test_report_without_an_evaluation_says_what_to_run(tmp_path, capsys):
    from demo.report import main

    assert main([str(tmp_path)]) == 2
    assert "run train/evaluate.py first" in capsys.readouterr().err


def test_report_of_a_stacked_run_names_each_condition(tmp_path):
    """A stacked ControlNet's evaluation and validations name metrics per condition (canny/edge_f1); the
    curve and table use those names, and a condition without a metric is said to be unscored."""
    from demo.report import main

    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "eval").mkdir()
    Image.new("RGB", (96, 32)).save(run / "eval" / "grid.png")
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "controlnet": {"canny/edge_f1": 0.7, "depth/depth_rmse": 0.1},
        "base": {"canny/edge_f1": 0.5, "depth/depth_rmse": 0.2},
        "num_samples": 2, "condition": "canny,depth,invert", "task": None, "lower_is_better": ["depth/depth_rmse"],
        "grid": "grid.png", "conditions": ["canny", "depth", "invert"],
        "unscored": {"invert": "no controllability metric for the invert annotator (train/metrics.py)"},
    }))
    curve = [r for s in (100, 200) for r in ({"step": s, "condition": "canny", "canny/edge_f1": s / 400},
                                             {"step": s, "condition": "depth", "depth/depth_rmse": 20 / s},
                                             {"step": s, "condition": "invert", "unscored": "no metric"})]
    (run / "validation" / "metrics.jsonl").write_text("\n".join(json.dumps(c) for c in curve))
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| canny/edge_f1 | 0.700 | 0.500 | ControlNet |" in report
    assert "| depth/depth_rmse | 0.100 | 0.200 | ControlNet |" in report
    assert "`invert`: unscored, no controllability metric" in report
    assert (run / "metrics_curve.png").is_file()


def test_report_defines_its_metrics_rounds_the_loss_and_says_why_the_table_and_the_curve_differ(tmp_path):
    """Every metric in the table is defined; a metric both score 1.0 on is called what the base already knows;
    the loss is rounded; and the report says where the table's and the curve's figures come from (rows, seeds)."""
    from demo.report import main

    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "eval").mkdir()
    Image.new("RGB", (96, 32)).save(run / "eval" / "grid.png")
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "controlnet": {"edge_f1": 0.6, "circle_iou": 0.735, "colour_accuracy": 1.0},
        "base": {"edge_f1": 0.17, "circle_iou": 0.29, "colour_accuracy": 1.0},
        "num_samples": 32, "condition": "canny", "task": "circle", "lower_is_better": [], "grid": "grid.png",
        "settings": {"seed": 0},
    }))
    curve = [{"step": 200, "circle_iou": 0.5}, {"step": 800, "circle_iou": 0.754}, {"step": "final", "circle_iou": 0.754}]
    (run / "validation" / "metrics.jsonl").write_text("\n".join(json.dumps(c) for c in curve))
    (run / "train_summary.json").write_text(json.dumps({
        "figures": {"global_step": 800, "final_loss": 0.055114176124334335},
        "args": {"seed": 7, "num_validation_rows": 32, "validation_image": []}}))
    assert main([str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "0.055114176124334335" not in report and "final loss 0.0551" in report
    for name in ("circle_iou", "edge_f1", "colour_accuracy"):
        assert f"- `{name}`: " in report
    assert "`colour_accuracy` is 1.000 for both: the base alone already" in report
    assert "`circle_iou` is" not in report  # only metrics both get perfectly right
    assert "seed 0 + i" in report and "same seed 7" in report and "first 32 ok rows" in report
