"""The ``validate`` stage: decide which raw images later stages may trust.

Two kinds of evidence are combined:

* **Image checks** (``validation/checks.py``, plain Python, every file fully decoded):
  missing, empty, not an image, truncated/corrupt JPEG, wrong colour mode, blank,
  changed since the manifest. These need the bytes, so they are cheap Pillow work done
  in a thread pool.
* **A Great Expectations suite** over the manifest and two frames derived from it
  (per-class counts, pixel-hash label groups). The rules are declared once as data
  (``validation/rules.py``) and run by the GX adapter (``validation/gx.py``). GX is
  used for the table-level rules because its results and Data Docs are the audit trail
  a reviewer can open in a browser.

The Data Docs go to ``reports/validation_docs/``, beside the stage's outputs but not
one of them: GX names their folders and stamps their pages with the run's time, so they
would make a re-run on identical data hash differently. They are logged to MLflow.

``validate.on_failure`` decides what a failure means (``validation/decision.py``).
``fail`` stops the pipeline with a summary naming the files (``validation/report.py``).
``quarantine`` drops the bad rows from the validated manifest and lists every one of
them in ``reports/validation/quarantine.csv``: nothing vanishes silently, and rows in ==
rows kept + rows quarantined is checked on every run (here, in the stage's I/O shell).

Dataset-level problems (a class with too few images, an unreadable manifest) cannot be
fixed by dropping rows, so they stop the stage under either policy.

Great Expectations is imported lazily: importing this module (for the CLI's ``--help``,
for the tests of other stages) must stay fast and free of GX and TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from alzstage.artifacts import read_raw_manifest, read_volumes, write_manifest
from alzstage.config import Params, Paths
from alzstage.data.sources.layout import SKIP_REASONS, SKIPPED_FILE, Skipped, read_skipped
from alzstage.data.validation.checks import check_images
from alzstage.data.validation.decision import QUARANTINE_COLUMNS, Outcome, decide
from alzstage.data.validation.gx import run_manifest_suite
from alzstage.data.validation.report import build_report, format_failure
from alzstage.errors import AlzstageError
from alzstage.files import atomic_dir, write_csv, write_json
from alzstage.result import StageResult

log = logging.getLogger(__name__)


def skipped_rows(skipped: list[Skipped]) -> pd.DataFrame:
    """Download's skip list as quarantine rows (path relative to the source, not data/raw)."""
    rows = [
        {
            "path": s.path,
            "label": s.label,
            "reasons": s.reason,
            "details": f"{s.reason}: skipped at download, not in data/raw: {s.detail}; "
            + SKIP_REASONS.get(s.reason, ""),
        }
        for s in skipped
    ]
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def run_validate(params: Params, paths: Paths) -> StageResult:
    """Validate data/raw, write the validated manifest, quarantine list, report and Data Docs.

    The report, quarantine list and Data Docs are written even when the stage fails, so
    the person fixing the data has them; the validated manifest only when it passes.
    """
    # 1. The evidence: image checks on every file, the GX suite (with its Data Docs).
    manifest = read_raw_manifest(paths.raw_manifest)
    image_problems = check_images(manifest, paths.raw, params)
    # The per-volume QC table exists only for data.source: nifti (see alzstage.data.sources.nifti).
    volumes = read_volumes(paths.raw_volumes) if paths.raw_volumes.exists() else None
    docs_root = paths.data_docs
    with atomic_dir(docs_root) as tmp_docs:
        suite = run_manifest_suite(manifest, params, tmp_docs, volumes)
    docs_index = docs_root / "index.html"
    suite = dataclasses.replace(suite, data_docs=str(docs_index))  # where the docs now are

    # 2. The decision under validate.on_failure, and its report.
    outcome = decide(manifest, image_problems, suite, params, volumes)
    report = build_report(manifest, image_problems, suite, outcome, params)
    # Files download saw but did not keep are listed here too: one list of everything
    # that is not trained on. They never reached the manifest, so they fail no rule.
    skipped = skipped_rows(read_skipped(paths.raw / SKIPPED_FILE))
    report["n_skipped_at_download"] = len(skipped)

    # 3. The lists and the report, written pass or fail.
    _write_lists(paths, outcome, skipped, report)

    # 4. A failure stops here, naming the files and how to fix them.
    rel = _relative_to(paths.root)
    if not report["stage_passed"]:
        raise AlzstageError(
            format_failure(
                rel(paths.raw_manifest),
                manifest,
                image_problems,
                suite,
                outcome,
                params,
                rel(paths.quarantine),
                rel(docs_index),
            )
        )

    # 5. A pass: say what was left out, write the validated manifest.
    _warn_left_out(outcome, len(manifest), len(skipped), paths, rel)
    write_manifest(outcome.clean, paths.validated_manifest)
    return StageResult(
        metrics=_metrics(report, outcome, len(skipped)),
        artifacts=[paths.validation_report, paths.quarantine, docs_root],
        tags={
            "validate.on_failure": params.validate_.on_failure,
            "validate.success": str(report["success"]).lower(),
        },
        summary=(
            f"validated {len(manifest)} images: {len(outcome.clean)} valid, "
            f"{len(outcome.quarantine)} quarantined"
            + (f", {len(skipped)} skipped at download" if len(skipped) else "")
            + f"; Data Docs {rel(docs_index)}"
        ),
    )


def _write_lists(paths: Paths, outcome: Outcome, skipped: pd.DataFrame, report: dict) -> None:
    """The quarantine list (with download's skips), the volume lists and the report."""
    listed = [df for df in (outcome.quarantine, skipped) if len(df)] or [outcome.quarantine]
    write_csv(paths.quarantine, pd.concat(listed, ignore_index=True))
    for stale in (paths.volume_qc, paths.quarantine_volumes):
        stale.unlink(missing_ok=True)  # from an earlier run on a nifti source
    if outcome.volumes is not None and outcome.volume_quarantine is not None:
        write_csv(paths.volume_qc, outcome.volumes)
        write_csv(paths.quarantine_volumes, outcome.volume_quarantine)
    write_json(paths.validation_report, report)


def _warn_left_out(
    outcome: Outcome, n_images: int, n_skipped: int, paths: Paths, rel: Callable[[Path], str]
) -> None:
    """One warning per kind of thing a passing run leaves out, with the list to read."""
    if not outcome.quarantine.empty:
        log.warning(
            "validate: quarantined %d of %d images (reasons in %s)",
            len(outcome.quarantine),
            n_images,
            rel(paths.quarantine),
        )
    if n_skipped:
        log.warning(
            "validate: %d file(s) skipped at download are listed in %s",
            n_skipped,
            rel(paths.quarantine),
        )
    vq = outcome.volume_quarantine
    if vq is not None and len(vq):
        log.warning(
            "validate: quarantined %d volume(s) (subjects %s; reasons in %s)",
            len(vq),
            ", ".join(vq["subject"].astype(str)),
            rel(paths.quarantine_volumes),
        )


def _metrics(report: dict, outcome: Outcome, n_skipped: int) -> dict[str, float]:
    """The run's MLflow metrics: counts, per-check and per-expectation failures, classes."""
    metrics: dict[str, float] = {
        "n_images": float(report["n_images"]),
        "n_valid": float(report["n_valid"]),
        "n_quarantined": float(report["n_quarantined"]),
        "n_skipped_at_download": float(n_skipped),
        "success": float(report["success"]),
    }
    metrics.update({f"check.{k}": float(n) for k, n in report["checks"].items()})
    metrics.update(
        {
            f"expectation.{k}.unexpected": float(e["unexpected"])
            for k, e in report["expectations"].items()
        }
    )
    metrics.update({f"class_count.{c}": float(n) for c, n in outcome.class_counts.items()})
    if "volumes" in report:
        metrics.update(
            {f"volumes.{k}": float(report["volumes"][k]) for k in ("n_volumes", "n_valid")}
        )
        metrics["volumes.n_quarantined"] = float(report["volumes"]["n_quarantined"])
    return metrics


def _relative_to(root: Path):
    def rel(p: Path) -> str:
        try:
            return Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            return str(p)

    return rel
