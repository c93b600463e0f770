"""NIfTI preprocessing time per volume: load, normalise, register, mask, slice.

    python benchmarks/bench_neuro.py [--n 3] [--voxel-mm 1.0] [--registration-resolution 2]

Each volume is the MNI152 T1 shipped with nilearn, moved by a random rotation (+-8
degrees), shift (+-8 mm) and scale (+-4 %), resampled to ``--voxel-mm`` isotropic voxels
with a 16 mm margin, intensity-scaled with a bias gradient and stored as int16
``.nii.gz`` (the shape of a typical 1 mm T1 export). Timing covers
:func:`alzstage.neuro.preprocess.preprocess_volume` with the repository's
``neuro.preprocess`` params (32 slices at 208x176), except where flags override them.
Writing the files is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from neuro_volumes import moved_affine, save_nifti, synthetic_volume

from alzstage.config import Params, load_params
from alzstage.neuro.preprocess import STEPS, preprocess_volume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="volumes to time")
    ap.add_argument("--voxel-mm", type=float, default=1.0, help="input voxel size")
    ap.add_argument("--registration-resolution", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    root = Path(__file__).resolve().parents[1]
    params: Params = load_params(root / "params.yaml")
    pre = params.neuro.preprocess
    if args.registration_resolution is not None:
        pre = pre.model_copy(update={"registration_resolution": args.registration_resolution})
    rng = np.random.default_rng(args.seed)

    # Warm-up outside the timing: nilearn's import and template resampling happen once per
    # process (about 3 s), and every later volume reuses them.
    t = time.perf_counter()
    from alzstage.neuro.register import mni152

    mni152(1)
    mni152(pre.registration_resolution)
    warmup = time.perf_counter() - t

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            truth = moved_affine(
                tuple(rng.uniform(-8, 8, 3)), tuple(rng.uniform(-8, 8, 3)), rng.uniform(0.96, 1.04)
            )
            data, affine = synthetic_volume(truth, resolution=args.voxel_mm, bias=0.15)
            path = save_nifti(Path(tmp) / f"sub-{i:02d}.nii.gz", data, affine)
            size_mb = path.stat().st_size / 2**20
            t = time.perf_counter()
            out = preprocess_volume(path, pre, params.base.image_size)
            total = time.perf_counter() - t
            rows.append((data.shape, size_mb, out.timings, total, out.qc["registration_score"]))

    print(
        f"# {args.n} volume(s), {args.voxel_mm:g} mm voxels, shape {rows[0][0]}, "
        f"{rows[0][1]:.1f} MB .nii.gz; registration on the {pre.registration_resolution} mm "
        f"template; {pre.n_slices} slices of {params.base.image_size[0]}x"
        f"{params.base.image_size[1]}; {os.cpu_count()} CPU(s); one-off warm-up {warmup:.1f} s"
    )
    print("| step | mean s | min s | max s |")
    print("|---|---|---|---|")
    for step in (*STEPS, "total"):
        vals = [r[3] if step == "total" else r[2].get(step, 0.0) for r in rows]
        print(f"| {step} | {statistics.mean(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    scores = [r[4] for r in rows]
    print(f"registration score: min {min(scores):.3f}, mean {statistics.mean(scores):.3f}")


if __name__ == "__main__":
    main()
