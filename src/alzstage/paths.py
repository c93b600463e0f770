"""Where everything lives: the project root, the tracking home and every path a stage
reads or writes (:class:`Paths`), in one place as cookiecutter-data-science keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = "params.yaml"

# --------------------------------------------------------------------------- paths


def project_root(start: Path | None = None) -> Path:
    """The repository root: the nearest parent holding ``dvc.yaml`` (or ``params.yaml``).

    ``ALZSTAGE_ROOT`` wins when set, which lets tests and cluster jobs run from elsewhere.
    """
    env = os.environ.get("ALZSTAGE_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / PARAMS_FILE).exists():
            return candidate
    return here


def tracking_home(root: Path) -> Path:
    """Where ``mlflow.db`` and ``mlruns/`` live for a checkout.

    ``dvc exp run`` executes in throw-away copies under ``<repo>/.dvc/tmp/exps/...``; runs
    logged there must land in the main repo's store, not vanish with the copy.
    """
    parts = root.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


class Paths:
    """Every file a stage reads or writes, in one place, relative to the project root."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or project_root()).resolve()
        r = self.root
        self.raw = r / "data" / "raw"
        self.raw_images = self.raw / "images"
        self.raw_manifest = self.raw / "manifest.csv"
        self.raw_volumes = self.raw / "volumes.csv"  # per-volume QC, data.source: nifti only
        self.interim = r / "data" / "interim"
        self.validated_manifest = self.interim / "manifest.csv"
        self.processed = r / "data" / "processed"
        self.pixels = self.processed / "pixels"  # every image decoded once (decode stage)
        self.split_file = self.processed / "split.csv"
        self.augmented = self.processed / "augmented"
        self.models = r / "models"
        self.model_file = self.models / "model.keras"
        self.train_run = self.models / "train_run.json"
        self.brain_model = self.models / "brain_model.json"
        self.reports = r / "reports"
        self.figures = self.reports / "figures"
        self.plots = self.reports / "plots"
        self.validation_report = self.reports / "validation.json"
        self.validation_dir = self.reports / "validation"
        self.quarantine = self.validation_dir / "quarantine.csv"
        self.volume_qc = self.validation_dir / "volumes.csv"
        self.quarantine_volumes = self.validation_dir / "quarantine_volumes.csv"
        # Great Expectations Data Docs: not a DVC output (GX stamps every page and folder
        # with the run's time, so they never hash alike twice); logged to MLflow instead.
        self.data_docs = self.reports / "validation_docs"
        self.split_report = self.reports / "split.json"
        self.train_report = self.reports / "train.json"
        self.metrics = self.reports / "metrics.json"  # evaluate's detail
        self.headline = self.reports / "headline.json"  # the run's `dvc metrics show` row
        self.promotion = self.reports / "promotion.json"
        # Subject k-fold cross-validation (cv/dvc.yaml)
        self.cv_folds = self.processed / "cv" / "folds.csv"
        self.cv_reports = self.reports / "cv"
        self.cache = r / ".cache" / "alzstage"
        # Shared by `dvc exp run` copies, like mlflow.db: a queued sweep reuses it.
        self.activation_cache = tracking_home(r) / ".cache" / "alzstage" / "activations"
        # Preprocessed NIfTI volumes by content (data.source: nifti), shared the same way.
        self.volume_cache = tracking_home(r) / ".cache" / "alzstage" / "volumes"
