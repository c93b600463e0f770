"""Data-stage timing at the size of the full public release: 6,400 slices of 176x208.

    python benchmarks/bench_data.py [--n 6400]

Generates synthetic grayscale JPEGs with subject structure (runs of 32 slowly changing
slices), then times what the download, validate and split stages do per image: the
manifest (hashes + decode), the image checks, the great-expectations suite and the
pseudo-subject grouping. Targets from the performance issue: manifest + validation
<= 60 s, grouping <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from alzstage.config import Params
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.data.similarity import load_thumbnails, pseudo_subjects
from alzstage.data.validation.checks import check_images
from alzstage.data.validation.gx import run_manifest_suite

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def make_images(root: Path, n: int, seed: int = 0) -> list[RawRecord]:
    rng = np.random.default_rng(seed)
    records = []
    yy, xx = np.mgrid[0:208, 0:176]
    for s in range(n // 32):
        label = CLASSES[s % len(CLASSES)]
        cy, cx, r = 104 + rng.normal(0, 6), 88 + rng.normal(0, 6), 70 + rng.normal(0, 5)
        # Smooth anatomy-like texture so adjacent slices are near-duplicates, as in MRI.
        texture = ndimage.gaussian_filter(rng.normal(0, 25, (208, 176)), 4) * 8
        for k in range(32):
            rad = r * np.sqrt(max(1 - ((k - 16) / 40) ** 2, 0.1))
            img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < rad**2, 120 + texture + k, 0)
            path = root / label / f"s{s:04d}_{k:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
            records.append(RawRecord(path=path, label=label))
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6400)
    args = ap.parse_args()
    params = Params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = make_images(root / "images", args.n)
        timings = {}
        t = time.perf_counter()
        manifest = build_manifest(records, root)
        timings["manifest (sha256 + decode)"] = time.perf_counter() - t
        t = time.perf_counter()
        issues = check_images(manifest, root, params)
        timings["image checks"] = time.perf_counter() - t
        t = time.perf_counter()
        run_manifest_suite(manifest, params, root / "docs")
        timings["great-expectations suite + Data Docs"] = time.perf_counter() - t
        t = time.perf_counter()
        thumbs = load_thumbnails([root / p for p in manifest["path"]], params.split.thumb_size)
        timings["thumbnails"] = time.perf_counter() - t
        t = time.perf_counter()
        groups = pseudo_subjects(thumbs, manifest["label"].to_numpy(), params.split.group_threshold)
        timings["pseudo-subject grouping"] = time.perf_counter() - t
    print(
        f"\n{len(manifest)} images, {len(issues)} image-check findings, "
        f"{len(set(groups))} pseudo-subjects (true: {args.n // 32})\n"
    )
    print("| step | seconds |\n|---|---|")
    for k, v in timings.items():
        print(f"| {k} | {v:.1f} |")
    mv = sum(v for k, v in timings.items() if k.startswith(("manifest", "image", "great")))
    grp = timings["thumbnails"] + timings["pseudo-subject grouping"]
    print(f"| **manifest + validation** | **{mv:.1f}** (target <= 60) |")
    print(f"| **grouping incl. thumbnails** | **{grp:.1f}** (target <= 60) |")


if __name__ == "__main__":
    main()
