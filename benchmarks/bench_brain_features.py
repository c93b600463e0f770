"""Which atrophy measurement, at which resolution, best stages a brain on its own?

The morphometric baseline and the brain model's atrophy feature (alzstage.data.morphometry)
were chosen with this harness: brain-level logistic regression (class-balanced, scaled) on
the mean over a brain's slices, in 5-fold subject CV repeated 5 times (StratifiedKFold over
brains, seeds 0-4), scored as balanced accuracy over all four classes and over the three
classes with more than two brains. No network is involved, so it runs in under a minute.

Usage, on a checkout where the archive has been split (``dvc repro split`` with
``data.source: archive``):

    python benchmarks/bench_brain_features.py --project /path/to/checkout [--json out.json]

It reads ``data/processed/split.csv`` (the recovered subjects) and the JPEGs under
``data/raw``; it writes nothing unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from alzstage.data.morphometry import slice_morphometry, slice_order

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    keep = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    return f"{model}; {' '.join(keep)}"


def measures(gray: np.ndarray) -> dict[str, float]:
    """The shipped measurement plus the alternatives it was chosen over."""
    g = gray.astype(np.float32)
    head = ndimage.binary_fill_holes(g > 0.1 * g.max())
    inside = g[head]
    med = float(np.median(inside))
    return {
        **slice_morphometry(gray),
        "fixed_level_60": float((inside < 60).mean()),
        "below_40pct_median": float((inside < 0.4 * med).mean()),
    }


def brain_cv(x: np.ndarray, y: np.ndarray, repeats: int = 5) -> tuple[float, float]:
    """Mean over repeats of (4-class, 3-class) balanced accuracy of brain-level LR."""
    out = []
    for seed in range(repeats):
        pred = np.zeros_like(y)
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(
            x, np.minimum(y, 2)
        ):
            lr = make_pipeline(
                StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)
            )
            pred[te] = lr.fit(x[tr], y[tr]).predict(x[te])
        out.append(
            (
                balanced_accuracy_score(y, pred),
                recall_score(y, pred, labels=[0, 1, 2], average="macro"),
            )
        )
    return tuple(float(v) for v in np.mean(out, axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    split = pd.read_csv(args.project / "data/processed/split.csv")
    rows = []
    for size in ((176, 208), (88, 104), (48, 56)):
        for path in split["path"]:
            gray = np.asarray(Image.open(args.project / "data/raw" / path).convert("L"))
            if size != (176, 208):
                gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))
            rows.append({"size": f"{size[1]}x{size[0]}", "path": path, **measures(gray)})
    table = pd.DataFrame(rows).merge(split[["path", "label", "subject"]], on="path")
    results = []
    for size, part in table.groupby("size", sort=False):
        brains = part.groupby("subject")
        y = brains["label"].first().map(CLASSES.index).to_numpy()
        for name in ("morph_csf_fraction", "fixed_level_60", "below_40pct_median"):
            four, three = brain_cv(brains[name].mean().to_numpy()[:, None], y)
            results.append(
                {"size": size, "feature": name, "position": "mean", "bacc4": four, "bacc3": three}
            )
    # Where each slice sits: the CSF fraction in quarters of the recovered slice order.
    full = table[table["size"] == "208x176"]
    thumbs = {
        p: np.asarray(Image.open(args.project / "data/raw" / p).convert("L").resize((32, 32)))
        for p in full["path"]
    }
    quarters, labels = [], []
    for _, brain in full.groupby("subject"):
        order = slice_order(
            np.stack([thumbs[p] for p in brain["path"]]), brain["morph_head_fraction"].to_numpy()
        )
        csf = brain["morph_csf_fraction"].to_numpy()[order]
        quarters.append([q.mean() for q in np.array_split(csf, 4)])
        labels.append(CLASSES.index(brain["label"].iloc[0]))
    four, three = brain_cv(np.array(quarters), np.array(labels))
    results.append(
        {
            "size": "208x176",
            "feature": "morph_csf_fraction",
            "position": "quarters",
            "bacc4": four,
            "bacc3": three,
        }
    )
    report = {
        "cpu": cpu_flags(),
        "seconds": round(time.perf_counter() - t0, 1),
        "brains": int(split["subject"].nunique()),
        "results": results,
    }
    for r in results:
        print(
            f"{r['size']:>8} {r['feature']:<20} {r['position']:<9} "
            f"bacc4 {r['bacc4']:.3f}  bacc3 {r['bacc3']:.3f}"
        )
    print(f"{report['brains']} brains, {report['seconds']} s; {report['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
