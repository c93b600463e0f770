"""Measure the split stage on the real Kaggle archive (never part of the test suite).

Why: pseudo-subject recovery and the leakage numbers are claims about *real* data; this
script is how they were measured and how to re-check them after a change.

    python benchmarks/bench_split.py --archive /path/to/alzheimers-dataset-4-class-of-images.zip

The archive (zip or an extracted folder) has ``Alzheimer_s Dataset/{train,test}/<Class>/``.
In ``test/`` a file ``S (k).jpg`` is slice S of subject k *within its class* (``S.jpg``
is subject 1): that is the ground truth used below. Train files carry no subject info,
so on the whole archive we can only compare group counts and sizes with the known
160 subjects x 32 slices (NonDemented 80, VeryMild 56, Mild 22, Moderate 2) and check
purity on the test files. Images are extracted to a temporary folder, never the repo.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, homogeneity_completeness_v_measure

from alzstage.artifacts import write_manifest
from alzstage.config import Params, Paths, SplitParams
from alzstage.data.decode import run_decode
from alzstage.data.manifest import MANIFEST_COLUMNS
from alzstage.data.similarity import load_thumbnails, pseudo_subjects
from alzstage.data.split import split_by_source, split_by_subject, split_stratified
from alzstage.data.split_report import LEAKAGE_SWEEP, leakage_report
from alzstage.data.split_stage import assign_subjects, run_split

TRUE_SUBJECTS = {
    "NonDemented": 80,
    "VeryMildDemented": 56,
    "MildDemented": 22,
    "ModerateDemented": 2,
}
_TEST_NAME = re.compile(r"^(\d+)(?: \((\d+)\))?\.jpg$", re.IGNORECASE)


def find_dataset_root(archive: Path, workdir: Path) -> Path:
    if archive.is_dir():
        base = archive
    else:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(workdir)
        base = workdir
    hits = sorted(p.parent for p in base.rglob("test") if (p.parent / "train").is_dir())
    if not hits:
        sys.exit(f"{archive}: no folder with train/ and test/ inside")
    return hits[0]


def build_manifest(root: Path) -> pd.DataFrame:
    rows = []
    for p in sorted(root.glob("*/*/*.jpg")):
        split, cls = p.parts[-3], p.parts[-2]
        true = ""
        if split == "test":
            m = _TEST_NAME.match(p.name)
            true = f"{cls}-{int(m.group(2) or 1)}" if m else ""
        rows.append(
            {
                "path": p.relative_to(root).as_posix(),
                "label": cls,
                "source_split": split,
                "subject": "",
                "true_subject": true,
                "slice": int(m.group(1)) if split == "test" and m else -1,
            }
        )
    return pd.DataFrame(rows).sort_values("path").reset_index(drop=True)


def sizes_text(ids: np.ndarray) -> str:
    s = pd.Series(ids).value_counts().to_numpy()
    hist = pd.Series(s).value_counts().sort_index()
    return (
        f"n_groups={len(s)} size min/median/max={s.min()}/{np.median(s):g}/{s.max()} "
        f"histogram(size:count)={dict(hist.items())}"
    )


def quality(true: np.ndarray, pred: np.ndarray) -> str:
    h, c, _ = homogeneity_completeness_v_measure(true, pred)
    return f"ARI={adjusted_rand_score(true, pred):.4f} homogeneity={h:.4f} completeness={c:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--thumb-size", type=int, default=SplitParams().thumb_size)
    ap.add_argument("--group-threshold", type=float, default=SplitParams().group_threshold)
    ap.add_argument(
        "--near-duplicate-threshold", type=float, default=SplitParams().near_duplicate_threshold
    )
    ap.add_argument("--sweep", action="store_true", help="also sweep thumb sizes x thresholds")
    ap.add_argument("--report-out", type=Path, help="copy the end-to-end split.json here")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory(prefix="bench_split_") as tmp:
        tmp = Path(tmp)
        root = find_dataset_root(args.archive, tmp / "x")
        df = build_manifest(root)
        files = [root / p for p in df["path"]]
        print(f"archive: {len(df)} images, {df.label.nunique()} classes, root {root}")

        t = time.perf_counter()
        thumbs = load_thumbnails(files, args.thumb_size)
        t_thumb = time.perf_counter() - t
        t = time.perf_counter()
        groups = pseudo_subjects(thumbs, df["label"].to_numpy(), args.group_threshold)
        t_group = time.perf_counter() - t
        print(
            f"\n[timing] thumbnails {t_thumb:.2f}s + grouping {t_group:.2f}s for {len(df)} images "
            f"(thumb_size={args.thumb_size}, group_threshold={args.group_threshold})"
        )
        # 6,400-image timing (the size of the full 200-subject release): pad with jittered
        # copies; quality is not measured on these, only the cost of the graph step.
        rng = np.random.default_rng(0)
        extra = thumbs[rng.choice(len(thumbs), 6400 - len(thumbs), replace=False)]
        big = np.vstack([thumbs, extra + rng.normal(0, 0.01, extra.shape).astype(np.float32)])
        big_labels = np.concatenate([df["label"].to_numpy(), df["label"].to_numpy()[: len(extra)]])
        t = time.perf_counter()
        pseudo_subjects(big, big_labels, args.group_threshold)
        print(f"[timing] grouping 6,400 thumbnails: {time.perf_counter() - t:.2f}s")

        test = (df["source_split"] == "test").to_numpy()
        true_test = df.loc[test, "true_subject"].to_numpy()
        g_test = pseudo_subjects(
            thumbs[test], df.loc[test, "label"].to_numpy(), args.group_threshold
        )
        print("\n[test/ only: ground truth from file names]")
        print(f"  true subjects: {pd.Series(true_test).nunique()}; recovered: {sizes_text(g_test)}")
        print(f"  {quality(true_test, g_test)}")
        for cls in TRUE_SUBJECTS:
            m = (df.loc[test, "label"] == cls).to_numpy()
            print(
                f"    {cls:17s} true {pd.Series(true_test[m]).nunique():3d} "
                f"found {pd.Series(g_test[m]).nunique():3d}"
            )

        print("\n[whole archive, train+test: true 160 subjects x 32 slices]")
        print(f"  recovered: {sizes_text(groups)}")
        for cls, n in TRUE_SUBJECTS.items():
            m = (df["label"] == cls).to_numpy()
            print(f"    {cls:17s} true {n:3d} found {pd.Series(groups[m]).nunique():3d}")
        print(
            "  on the test files (purity of whole-archive groups): "
            f"{quality(true_test, groups[test])}"
        )
        both = pd.DataFrame({"g": groups, "s": df["source_split"]}).groupby("g")["s"].nunique()
        print(
            f"  groups spanning the archive's train and test: {int((both == 2).sum())}/{len(both)}"
        )

        if args.sweep:
            print("\n[sweep: whole-archive n_groups (groups of exactly 32) | test-part ARI]")
            for size in (16, 24, 32, 48):
                x = load_thumbnails(files, size)
                for thr in (0.9, 0.95, 0.97, 0.98, 0.99, 0.995):
                    g = pseudo_subjects(x, df["label"].to_numpy(), thr)
                    n32 = int((pd.Series(g).value_counts() == 32).sum())
                    ari = adjusted_rand_score(true_test, g[test])
                    print(
                        f"  thumb {size:2d} thr {thr:.3f}: {len(set(g)):4d} ({n32:3d}) | {ari:.4f}"
                    )

        print(
            f"\n[leakage: fraction of test (val) images whose best train match has corr >= "
            f"{args.near_duplicate_threshold} at thumb {args.thumb_size}]"
        )
        base = df[["path", "label", "source_split", "subject"]].copy()
        base = assign_subjects(base, thumbs, args.group_threshold)
        params = Params(
            split=SplitParams(
                thumb_size=args.thumb_size,
                group_threshold=args.group_threshold,
                near_duplicate_threshold=args.near_duplicate_threshold,
            )
        )
        asis = base.assign(split=base["source_split"])  # the archive's split, no val carved
        rep = leakage_report(asis, thumbs, args.near_duplicate_threshold)
        te = rep["test"]
        sweep = " ".join(f"{k[5:]}:{v:.3f}" for k, v in te["fraction_by_threshold"].items())
        print(
            f"  {'archive':10s} test {te['n_near_duplicate_in_train']:4d}/{te['n_images']:4d} = "
            f"{te['fraction_near_duplicate']:.3f} (as shipped: no val); test images whose "
            f"subject is in train {te['fraction_subject_in_train']:.3f}; shared subjects "
            f"train/test {rep['shared_subjects']['train_test']}"
        )
        print(f"  {'':10s} test fraction by threshold {sweep}")
        for name, fn in [
            ("source", split_by_source),
            ("stratified", split_stratified),
            ("subject", split_by_subject),
        ]:
            out = fn(base, params)
            pos = pd.Index(base["path"]).get_indexer(out["path"])
            rep = leakage_report(out, thumbs[pos], args.near_duplicate_threshold)
            te, va = rep["test"], rep["val"]
            sweep = " ".join(f"{k[5:]}:{v:.3f}" for k, v in te["fraction_by_threshold"].items())
            print(
                f"  {name:10s} test {te['n_near_duplicate_in_train']:4d}/{te['n_images']:4d} = "
                f"{te['fraction_near_duplicate']:.3f} (val {va['fraction_near_duplicate']:.3f}); "
                f"test images whose subject is in train {te['fraction_subject_in_train']:.3f}; "
                f"shared subjects train/test {rep['shared_subjects']['train_test']}"
            )
            print(f"  {'':10s} test fraction by threshold {sweep}")
        print(f"  (sweep thresholds: {LEAKAGE_SWEEP})")

        # the whole stage, as the pipeline runs it (manifest in a throw-away project)
        proj = tmp / "proj"
        paths = Paths(proj)
        paths.raw.mkdir(parents=True)
        (paths.raw / "images").symlink_to(root, target_is_directory=True)
        man = df.assign(path="images/" + df["path"])
        for col in MANIFEST_COLUMNS:
            if col not in man:
                man[col] = 0 if col in ("width", "height") else ""
        paths.interim.mkdir(parents=True)
        write_manifest(man[MANIFEST_COLUMNS], paths.validated_manifest)
        run_decode(params, paths)  # split reads its thumbnails from the decode stage
        t = time.perf_counter()
        res = run_split(params, paths)
        print(f"\n[run_split end to end] {time.perf_counter() - t:.2f}s: {res.summary}")
        if args.report_out:
            args.report_out.write_text(paths.split_report.read_text())


if __name__ == "__main__":
    main()
