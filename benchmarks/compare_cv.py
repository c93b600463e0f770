"""Paired comparison of two subject-CV runs on the same folds, at brain level.

Two recipes (e.g. ``train.head: softmax`` vs ``ordinal``) run through ``cv/dvc.yaml``
with the same ``base.seed`` and ``cv`` params test the same brains in the same folds and
repeats. Their ``reports/cv/brains_oof.csv`` rows then pair up by (repeat, subject), and
a brain bootstrap of the difference (the same brains drawn for both) says whether one
recipe beats the other, as the CV report does for the baselines.

    python benchmarks/compare_cv.py A/reports/cv/brains_oof.csv B/reports/cv/brains_oof.csv \
        [--variant logistic_cnn] [--names softmax ordinal]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from alzstage.evaluate.brain import bootstrap_brains

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--variant", default="logistic_cnn", help="brain model column prefix")
    ap.add_argument("--names", nargs=2, default=["a", "b"])
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    a, b = (pd.read_csv(p, keep_default_na=False) for p in (args.a, args.b))
    keys = ["repeat", "subject"]
    both = a.merge(b, on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(
            f"the runs test different brains ({len(a)} and {len(b)} rows, {len(both)} shared): "
            "run both with the same base.seed and cv params"
        )
    if not (both["y_a"] == both["y_b"]).all() or not (both["fold_a"] == both["fold_b"]).all():
        raise SystemExit("the runs put brains in different folds: not a paired comparison")
    y = both["y_a"].to_numpy(np.int64)
    preds = {
        name: both[f"{args.variant}_pred_{s}"].to_numpy(np.int64)
        for name, s in zip(args.names, ("a", "b"), strict=True)
    }
    out = bootstrap_brains(
        y, preds, both["subject"].to_numpy(), CLASSES, reference=args.names[0], seed=args.seed
    )
    for name, p in out["predictors"].items():
        print(
            f"{name:>10}: bacc (main) {p['balanced_accuracy_main']:.3f}, all "
            f"{p['balanced_accuracy']:.3f}, QWK {p['qwk']:.3f}, "
            f"MAE {p['mean_absolute_stage_error']:.3f}"
        )
    diff = out["predictors"][args.names[1]]["vs_reference"]
    print(json.dumps({f"{args.names[0]} - {args.names[1]}": diff}, indent=1))


if __name__ == "__main__":
    main()
