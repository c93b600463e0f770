"""Pull-request report: this branch vs its base branch, both reproduced on the small sample.

Why the base is reproduced here instead of read from git: pipeline outputs (metrics,
plots, models) are DVC outputs, not git files, and a runner has no DVC remote to pull
them from. So the base branch is checked out in a git worktree, shrunk with the same
``small_sample.py`` and reproduced with the *same* DVC cache as the PR checkout (stages
the PR did not touch are restored from DVC's run-cache rather than re-run). Its
``dvc.lock`` is then committed locally (never pushed), which gives DVC a revision to
diff against: ``dvc params diff``, ``dvc metrics diff`` and ``dvc plots diff`` all read
the base side through that commit and the shared cache.

    python .github/scripts/pr_report.py base --ref origin/main --dir "$RUNNER_TEMP/base"
    python .github/scripts/pr_report.py report --base-rev SHA --summary "$GITHUB_STEP_SUMMARY"

``base`` prints ``rev=<sha>`` (and appends it to ``--github-output``); when the base
cannot be reproduced (no pipeline there yet, or it fails) ``report`` still writes this
branch's metrics and plots and says why there is no comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SMALL_SAMPLE = HERE / "small_sample.py"
# The metrics a reviewer looks at first; the full diff follows in a collapsed block.
# reports/headline.json is the pipeline's only DVC metric; the detail files are stage
# outputs, which `dvc metrics diff` reads when they are named as targets.
DIFF_TARGETS = ["reports/headline.json", "reports/metrics.json", "reports/train.json"]
HEADLINE = [
    ("reports/metrics.json", "balanced_accuracy"),
    ("reports/metrics.json", "macro_f1"),
    ("reports/metrics.json", "accuracy"),
    ("reports/metrics.json", "quadratic_weighted_kappa"),
    ("reports/metrics.json", "roc_auc.macro"),
    ("reports/metrics.json", "ece"),
]
HISTORY_COLUMNS = ["epoch", "phase", "loss", "val_loss", "val_balanced_accuracy", "val_macro_f1"]


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), f"(in {cwd})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return proc


# ----------------------------------------------------------------- markdown pieces


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def headline_rows(repo: Path, diff: dict[str, Any] | None) -> list[list[Any]]:
    """[metric, base, this PR, change] from ``dvc metrics diff --json --all`` (or PR only)."""
    rows = []
    for file, key in HEADLINE:
        if diff is not None:
            entry = diff.get(file, {}).get(key)
            if entry is None:
                continue
            old, new, change = entry.get("old"), entry.get("new"), entry.get("diff")
        else:
            path = repo / file
            if not path.exists():
                continue
            old, change = None, None
            new = lookup(json.loads(path.read_text()), key)
            if new is None:
                continue
        rows.append([key, old, new, change])
    return rows


def confusion_markdown(matrix: list[list[int]], classes: list[str]) -> str:
    """Rows are the true stage, columns the predicted one (the order of base.classes)."""
    header = ["true ↓ / predicted →", *classes]
    rows = [[classes[i], *row] for i, row in enumerate(matrix)]
    return md_table(header, rows)


def history_markdown(csv_path: Path, max_rows: int = 40) -> str:
    with csv_path.open(newline="") as fh:
        records = list(csv.DictReader(fh))
    cols = [c for c in HISTORY_COLUMNS if records and c in records[0]]
    rows = []
    for rec in records[:max_rows]:
        row: list[Any] = []
        for c in cols:
            try:
                row.append(float(rec[c]) if c not in ("epoch", "phase") else rec[c])
            except ValueError:
                row.append(rec[c])
        rows.append(row)
    note = f"\n\n(first {max_rows} of {len(records)} epochs)" if len(records) > max_rows else ""
    return md_table(cols, rows) + note


def class_names(repo: Path) -> list[str]:
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    return list(params["base"]["classes"])


# ----------------------------------------------------------------- commands


def cmd_base(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    wt = Path(args.dir).resolve()
    if wt.exists():
        sh(["git", "worktree", "remove", "--force", str(wt)], repo, check=False)
        shutil.rmtree(wt, ignore_errors=True)
    sh(["git", "worktree", "add", "--detach", str(wt), args.ref], repo)
    if not (wt / "dvc.yaml").exists():
        print(f"{args.ref} has no dvc.yaml: nothing to compare against", file=sys.stderr)
        return 0
    sh([sys.executable, str(SMALL_SAMPLE), str(wt / "params.yaml")], wt)
    # One cache for both checkouts: unchanged stages come from the run-cache, and the
    # PR checkout can read the base outputs that the diff commands need.
    sh(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], wt)
    repro = sh(["dvc", "repro"], wt)
    print(repro.stdout[-6000:], file=sys.stderr)
    for rel in ("params.yaml", "dvc.lock", "reports/promotion.json"):
        if (wt / rel).exists():
            sh(["git", "add", "-f", rel], wt)
    sh(
        [
            "git",
            "-c",
            "user.name=alzstage-pr-report",
            "-c",
            "user.email=alzstage-pr-report@localhost",
            "commit",
            "-q",
            "--no-verify",
            "--allow-empty",
            "-m",
            f"{args.ref} reproduced on the small sample (local only)",
        ],
        wt,
    )
    rev = sh(["git", "rev-parse", "HEAD"], wt).stdout.strip()
    print(f"rev={rev}")
    if args.github_output:
        with open(args.github_output, "a") as fh:
            fh.write(f"rev={rev}\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rev = args.base_rev.strip()
    label = args.base_label
    parts = ["## alzstage pull-request report (small demo sample)", ""]

    diff = None
    if rev:
        parts.append(
            f"Compared with `{label}` (`{rev[:10]}`), reproduced on the same small sample "
            "in a worktree. Figures from one epoch on a few dozen synthetic slices: they "
            "show that the pipeline works and which way a change moves, not model quality."
        )
        proc = sh(
            ["dvc", "metrics", "diff", rev, "--all", "--json", "--targets", *DIFF_TARGETS],
            repo,
            check=False,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            diff = json.loads(proc.stdout)
    else:
        reason = args.base_status or "not reproduced"
        parts.append(
            f"**No comparison with `{label}`**: its pipeline could not be reproduced on the "
            f"small sample ({reason}; see the job log). This branch's figures only."
        )
    parts += ["", "### Headline metrics", ""]
    parts.append(md_table(["metric", label, "this PR", "change"], headline_rows(repo, diff)))

    if rev:
        params_md = sh(["dvc", "params", "diff", rev, "--md"], repo, check=False).stdout
        parts += ["", "### `dvc params diff`", "", params_md.strip() or "No parameter changes."]
        metrics_md = sh(
            ["dvc", "metrics", "diff", rev, "--md", "--targets", *DIFF_TARGETS], repo, check=False
        ).stdout
        parts += [
            "",
            "<details><summary><code>dvc metrics diff</code> (every changed metric)</summary>",
            "",
            metrics_md.strip() or "No metric changed.",
            "",
            "</details>",
        ]
    else:
        shown = sh(["dvc", "metrics", "show", "--md"], repo, check=False).stdout
        parts += [
            "",
            "<details><summary><code>dvc metrics show</code></summary>",
            "",
            shown.strip(),
            "",
            "</details>",
        ]

    metrics_file = repo / "reports" / "metrics.json"
    if metrics_file.exists():
        cm = json.loads(metrics_file.read_text()).get("confusion_matrix")
        if cm:
            parts += ["", "### Confusion matrix (test split, this PR)", ""]
            parts.append(confusion_markdown(cm, class_names(repo)))
    history = repo / "reports" / "plots" / "train_history.csv"
    if history.exists():
        parts += ["", "### Training curve (this PR)", "", history_markdown(history)]

    # Plots: interactive HTML (base and PR overlaid when there is a base) + the PNGs.
    plots_dir = out / "dvc_plots"
    plot_cmd = ["dvc", "plots", "diff", rev] if rev else ["dvc", "plots", "show"]
    plots = sh([*plot_cmd, "-o", str(plots_dir)], repo, check=False)
    figures = sorted((repo / "reports" / "figures").glob("*.png"))
    (out / "figures").mkdir(exist_ok=True)
    for png in figures:
        shutil.copy2(png, out / "figures" / png.name)
    parts += ["", "### Plots", ""]
    if plots.returncode == 0:
        parts.append(
            "`dvc_plots/index.html` (training curves, confusion matrix, ROC/PR, reliability"
            + (f"; `{label}` and this PR overlaid" if rev else "")
            + ") and the PNG figures "
            + ", ".join(f"`{p.name}`" for p in figures)
            + " are in this run's artifact."
        )
    else:
        parts.append(f"`dvc plots` failed: {plots.stderr.strip()[-500:]}")

    text = "\n".join(parts) + "\n"
    (out / "report.md").write_text(text)
    if args.summary:
        with open(args.summary, "a") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", help="the PR checkout (default: .)")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("base", help="reproduce the base branch in a worktree")
    b.add_argument("--ref", required=True, help="e.g. origin/main")
    b.add_argument("--dir", required=True, help="where to put the worktree")
    b.add_argument("--github-output", default=os.environ.get("GITHUB_OUTPUT"))
    r = sub.add_parser("report", help="write the markdown report and the plots")
    r.add_argument("--base-rev", default="", help="commit printed by `base` (empty: none)")
    r.add_argument("--base-label", default="main")
    r.add_argument("--base-status", default="", help="why there is no base, for the text")
    r.add_argument("--summary", default=None, help="append here (default: stdout)")
    r.add_argument("--out", default="pr-report", help="folder for report.md and plots")
    args = ap.parse_args(argv)
    return cmd_base(args) if args.command == "base" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
