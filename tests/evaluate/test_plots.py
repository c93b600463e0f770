"""The evaluate stage's curves and figures: CSV columns dvc.yaml names, figures from memory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from evaluate_cases import CLASSES, REPO, make_report, make_slices

from alzstage.evaluate.report import json_safe


def test_dvc_plot_definitions_match_the_csv_columns() -> None:
    """dvc.yaml names curve columns; a renamed column would silently drop a chart."""
    from alzstage.model.calibration import reliability_table
    from alzstage.model.metrics import pr_curves, roc_curves

    y, p, _ = make_slices()
    written = {
        "reports/plots/roc.csv": set(roc_curves(y, p, CLASSES)),
        "reports/plots/pr.csv": set(pr_curves(y, p, CLASSES)),
        "reports/plots/reliability.csv": set(pd.DataFrame(reliability_table(p, p, y))),
    }
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["base"]["classes"] == CLASSES
    checked = set()
    for entry in dvc["plots"]:
        if isinstance(entry, str):
            continue
        (props,) = entry.values()
        for path, fields in (props.get("y") or {}).items():
            if path in written:
                fields = [fields] if isinstance(fields, str) else fields
                assert {props["x"], *fields} <= written[path], path
                checked.add(path)
    assert checked == set(written)
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["evaluate"]["outs"]}
    assert set(written) <= outs


def test_plot_column_problems_name_a_class_scheme_dvc_yaml_does_not_list() -> None:
    """CN / MCI classes with the Kaggle names in dvc.yaml: the empty chart is reported."""
    from alzstage.evaluate.plots import plot_column_problems
    from alzstage.model.metrics import roc_curves

    # given: the ROC curves of a CN / MCI / LMCI / AD scheme, written as roc.csv
    y, p, _ = make_slices()
    roc = Path("reports/plots/roc.csv")
    other = roc_curves(y, p, ["CN", "MCI", "LMCI", "AD"]).columns
    # when
    (problem,) = plot_column_problems(REPO / "dvc.yaml", {roc: other})
    # then: dvc.yaml's chart of the Kaggle names is named, with the columns the CSV has
    assert "reports/plots/roc.csv" in problem and "NonDemented" in problem and "CN" in problem
    kaggle = roc_curves(y, p, CLASSES).columns
    assert plot_column_problems(REPO / "dvc.yaml", {roc: kaggle}) == []


def test_figures_drawn_from_memory_are_the_figures_of_the_csvs_written(tmp_path: Path) -> None:
    from alzstage.evaluate.plots import Curves, curve_tables, draw_figures, write_curves
    from alzstage.model.calibration import apply_temperature

    # given: a scored test split and its curves, in memory only
    y, raw, _ = make_slices()
    report = json_safe(make_report())
    probs = apply_temperature(raw, report["calibration"]["temperature"])
    curves = curve_tables(y, raw, probs, CLASSES)
    # when: the figures are drawn from the frames, and again from the CSVs read back
    drawn = draw_figures(curves, report, CLASSES, tmp_path / "memory")
    csvs = write_curves(curves, tmp_path / "plots")
    read_back = Curves(**{name: pd.read_csv(path) for name, path in csvs.items()})
    again = draw_figures(read_back, report, CLASSES, tmp_path / "from_csv")
    # then: no file was needed to draw them, and they are the figures of the files
    assert sorted(drawn) == ["confusion", "pr", "reliability", "roc"]
    assert {p.suffix for p in (tmp_path / "memory").iterdir()} == {".png"}
    for name, png in drawn.items():
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert png.read_bytes() == again[name].read_bytes(), name
