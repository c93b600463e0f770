"""End to end: a copy of the repo, real ``dvc repro`` on a tiny demo sample, real MLflow.

This is the test a new user's first five minutes depend on: the pipeline runs from a
clean checkout, logs every stage, registers a champion, is a no-op the second time, and
re-runs only what a param change touches.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

TINY = {
    "base": {"image_size": [64, 64]},
    "data": {"demo": {"subjects_per_class": [4, 4, 3, 3], "slices_per_subject": 4}},
    "split": {"min_subjects_per_class": 3},
    "augment": {"views": 1, "preview_count": 2},
    "model": {
        "weights": "none",
        "input_size": [64, 64],
        "dense_units": 16,
        "widths": [8, 16],
        "blocks": [1, 1],
    },
    "train": {"epochs": 1, "fine_tune_epochs": 0, "batch_size": 16, "scratch": {"epochs": 2}},
    "cv": {"folds": [0, 1, 2], "bootstrap": 100, "repeats": 2},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = (
            _merge(base.get(k, {}), v)
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return out


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALZSTAGE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kw)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def project_files() -> list[str]:
    """What a fresh clone holds: tracked files plus untracked ones git does not ignore."""
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def copy_tiny_project(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git repo holding this repo's working tree, with TINY (+ overrides) params."""
    for rel in project_files():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = _merge(yaml.safe_load((dest / "params.yaml").read_text()), TINY)
    params = _merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git+DVC checkout of the repo with tiny params, after one ``dvc repro``."""
    dest = copy_tiny_project(tmp_path_factory.mktemp("repo") / "alzstage")
    _run(["dvc", "repro"], dest)
    return dest


def test_outputs_exist(project: Path) -> None:
    for rel in [
        "data/raw/manifest.csv",
        "data/interim/manifest.csv",
        "data/processed/pixels/meta.json",
        "data/processed/split.csv",
        "data/processed/augmented/train.npz",
        "models/model.keras",
        "models/train_run.json",
        "reports/headline.json",
        "reports/metrics.json",
        "reports/validation.json",
        "reports/split.json",
        "reports/promotion.json",
        "reports/plots/train_history.csv",
        "reports/plots/confusion.csv",
        "reports/figures/augment_preview.png",
    ]:
        assert (project / rel).exists(), rel
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert key in metrics
    cm = metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == metrics["n_test"] > 0
    assert metrics["split_strategy"] == "subject" and metrics["split_leaky"] is False


def test_metrics_show_prints_the_headline_under_100_columns(project: Path) -> None:
    # when: a person asks DVC for the metrics (the CV has not run)
    done = _run(["dvc", "metrics", "show"], project)
    shown = done.stdout
    # then: one row, the run's headline, under 100 columns, with no warning
    lines = shown.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) < 100, shown
    assert len(lines) == 2 and lines[1].startswith("reports/headline.json"), shown
    assert "failed" not in done.stderr.lower() and "warning" not in done.stderr.lower()
    header = lines[0].split()
    head = json.loads((project / "reports/headline.json").read_text())
    assert sorted(head) == sorted(
        ["brain", "brain_ci", "morph", "cover", "set", "bacc", "leak", "valid"]
    )
    assert [k for k, v in head.items() if v is not None and k not in header] == [], shown
    row = next(line for line in lines if line.startswith("reports/headline.json")).split()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert float(row[header.index("bacc")]) == round(metrics["balanced_accuracy"], 3)


def test_every_stage_logged_under_one_pipeline_id(project: Path) -> None:
    db = sqlite3.connect(project / "mlflow.db")
    rows = db.execute(
        "SELECT r.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'alzstage.pipeline_id'"
    ).fetchall()
    stages = {name for name, _ in rows}
    expected = [
        "download",
        "validate",
        "decode",
        "split",
        "augment",
        "train",
        "evaluate",
        "promote",
    ]
    assert stages == set(expected)
    assert len({pid for _, pid in rows}) == 1, rows
    tags = dict(
        db.execute(
            "SELECT t.key, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.name = 'train'"
        ).fetchall()
    )
    assert tags["mlflow.source.git.commit"] != "unknown"
    assert any(k.startswith("dvc.dep.data/processed/augmented") for k in tags)
    assert (project / "mlruns").is_dir()


def test_train_outputs_hold_no_timings_and_mlflow_has_them(project: Path) -> None:
    # given: the pipeline has run (a DVC output with a duration in it never hashes alike)
    # when: the train stage's outputs and its MLflow run are read
    report = json.loads((project / "reports/train.json").read_text())
    history = pd.read_csv(project / "reports/plots/train_history.csv")
    db = sqlite3.connect(project / "mlflow.db")
    logged = {
        key
        for (key,) in db.execute(
            "SELECT DISTINCT m.key FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "WHERE r.name = 'train'"
        )
    }
    # then: no seconds or images/s in the outputs; the train run in MLflow has them
    assert "temperature" in report and "recipe" in report
    assert [k for k in report if k.endswith(("_seconds", "images_per_second"))] == []
    assert "epoch_seconds" not in history.columns and "val_balanced_accuracy" in history
    assert {"train_seconds", "epoch_seconds"} <= logged, sorted(logged)


def test_registry_has_champion(project: Path) -> None:
    code = (
        "import mlflow, json;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}');"
        "c = mlflow.MlflowClient();"
        # one registered model per dataset: <promote.model_name>-<dataset>
        "mv = c.get_model_version_by_alias('alzstage-demo', 'champion');"
        "ch = c.get_model_version_by_alias('alzstage-demo', 'challenger');"
        "print(json.dumps([mv.version, ch.version, mv.tags.get('split_fingerprint', '')]))"
    )
    out = _run([sys.executable, "-c", code], project).stdout.strip().splitlines()[-1]
    champion, challenger, fingerprint = json.loads(out)
    assert str(champion) == str(challenger) == "1"
    split = json.loads((project / "reports/split.json").read_text())
    assert fingerprint == split["fingerprint"]
    promo = json.loads((project / "reports/promotion.json").read_text())
    assert promo["promoted"] is True and promo["version"] == 1


def test_cv_pipeline_tests_every_subject_once_and_is_cached(project: Path) -> None:
    # given: the default pipeline has run; when: the CV pipeline runs (K = 3)
    out = _run(["dvc", "repro", "cv/dvc.yaml"], project).stdout
    assert "Running stage 'cv/dvc.yaml:cv_fold@2'" in out, out
    # then: every subject is tested in exactly one fold, and the pooled numbers are the
    # out-of-fold table's
    folds = pd.read_csv(project / "data/processed/cv/folds.csv", keep_default_na=False)
    oof = pd.read_csv(project / "reports/cv/predictions_oof.csv", keep_default_na=False)
    for repeat, column in ((0, "test_fold"), (1, "r1_test_fold")):
        part = oof[oof["repeat"] == repeat]
        assert sorted(part["path"]) == sorted(folds.loc[folds[column] >= 0, "path"])
        assert (part.groupby("subject")["fold"].nunique() == 1).all()
        assert set(part["fold"]) == {0, 1, 2}
    head = json.loads((project / "reports/cv/metrics.json").read_text())
    report = json.loads((project / "reports/cv/report.json").read_text())
    assert report["k"] == 3 and report["repeats"] == 2
    assert len(report["fold_spread"]["per_fold"]) == 6
    assert head["bacc"] == pytest.approx(
        balanced_accuracy_score(oof["label"], oof["predicted"]), abs=1e-3
    )
    # and every brain is scored once per repeat by a brain model fitted without it
    brains = pd.read_csv(project / "reports/cv/brains_oof.csv", keep_default_na=False)
    assert (brains.groupby("subject")["repeat"].nunique() == 2).all()
    assert len(brains) == 2 * folds["subject"].nunique()
    brain = report["brain_level"]
    assert head["brain"] == pytest.approx(
        brain["scores"]["predictors"][brain["default"]]["balanced_accuracy_main"], abs=1e-3
    )
    # every fold is an MLflow run tagged with its fold
    db = sqlite3.connect(project / "mlflow.db")
    tagged = db.execute("SELECT value FROM tags WHERE key = 'cv.fold'").fetchall()
    assert sorted(v for (v,) in tagged) == ["0", "1", "2"]
    # DVC caches it, and `dvc metrics show` prints the CV headline next to the default run's
    # when asked for both (the CV's headline is an out, not a metric: see test_stages)
    again = _run(["dvc", "repro", "cv/dvc.yaml"], project).stdout
    assert "Running stage" not in again, again
    both = ["dvc", "metrics", "show", "reports/headline.json", "reports/cv/metrics.json"]
    shown = _run(both, project).stdout
    assert "reports/cv/metrics.json" in shown and "reports/headline.json" in shown, shown


def test_second_repro_is_noop_and_metrics_show(project: Path) -> None:
    out = _run(["dvc", "repro"], project).stdout
    assert "didn't change" in out or "up to date" in out, out
    assert "Running stage" not in out
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = shown[""]["data"]
    # the CV's headline is an out, not a DVC metric: no row (and no warning) without a CV
    assert set(files) == {"reports/headline.json"}, files
    assert "bacc" in files["reports/headline.json"]["data"]
    plots = _run(["dvc", "plots", "show", "--json"], project).stdout
    assert "train_history" in plots and "confusion" in plots


def test_a_train_param_reruns_train_and_downstream_only_when_the_model_changes(
    project: Path,
) -> None:
    def repro_with(section: dict, key: str, value: int) -> tuple[set[str], str]:
        params = yaml.safe_load((project / "params.yaml").read_text())
        node = params["train"]
        for part in section:
            node = node[part]
        node[key] = value
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = _run(["dvc", "repro"], project).stdout
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        return ran, out

    # given the scratch recipe: train.epochs (the transfer recipe's head epochs) is a train
    # param it does not use; when it changes, train re-runs, writes the same model bytes
    # (canonical model.keras, no MLflow id in train_run.json), and nothing after it re-runs
    ran, out = repro_with((), "epochs", 2)
    assert ran == {"train"}, out
    assert "Stage 'evaluate' didn't change, skipping" in out, out
    # when a param the recipe uses changes, train and everything after it re-run
    ran, out = repro_with(("scratch",), "epochs", 3)
    assert ran == {"train", "evaluate", "promote"}, out
    for stage in ("download", "validate", "decode", "split", "augment"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out


def test_predict_prints_stage(project: Path) -> None:
    img = next((project / "data/raw/images").rglob("*.jpg"))
    out = _run(["alzstage", "predict", str(img), "--format", "json"], project).stdout
    payload = json.loads(out[out.index("{") :])
    pred = payload["predictions"][0]
    assert payload["model"] == "models:/alzstage-demo@champion"  # the demo data's champion
    assert pred["stage"] in TINY_CLASSES
    assert abs(sum(pred[c] for c in TINY_CLASSES) - 1.0) < 1e-4


TINY_CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def test_bad_param_names_key(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["strategy"] = "random"
    bad = project / "params.yaml"
    good = bad.read_text()
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        proc = subprocess.run(
            [str(BIN / "alzstage"), "split"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        bad.write_text(good)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "split.strategy" in err[0] and "'subject'" in err[0], proc.stderr
