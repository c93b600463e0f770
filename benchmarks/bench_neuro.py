"""NIfTI preprocessing time per volume: load, normalise, register, mask, slice.

    python benchmarks/bench_neuro.py [--n 3] [--voxel-mm 1.0] [--registration-resolution 2]
    python benchmarks/bench_neuro.py --compare [--n 6] [--repeat 2] [--threads 1]

Each volume is the MNI152 T1 shipped with nilearn, moved by a random rotation (+-8
degrees), shift (+-8 mm) and scale (+-4 %), resampled to ``--voxel-mm`` isotropic voxels
with a 16 mm margin, intensity-scaled with a bias gradient and stored as int16
``.nii.gz`` (the shape of a typical 1 mm T1 export). Timing covers
:func:`alzstage.neuro.preprocess.preprocess_volume` with the repository's
``neuro.preprocess`` params (32 slices at 208x176), except where flags override them.
Writing the files is not timed.

``--compare`` runs the reference settings (``REFERENCE_PARAMS``: the speed knobs as they
were before they were tuned) and the repository's params on the same volumes, one after
the other in the same process, alternating which goes first, and prints per volume the
time of each, their ratio, the lowest per-slice NCC between the two slice stacks, the
change of the registration score, both QC verdicts (every ``validate.nifti`` rule), and
both registrations' error against the transform the volume was made with. The volumes
(``--n`` of ``COMPARE_VOLUMES``, up to 6) vary pose, head size, field of view, storage
order, noise and bias, and include two that the QC rejects: NaN voxels, and a head
upside down (which the registration cannot recover, so the score rule fails).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _machine import params_info, params_text, warn_if_params_differ
from neuro_volumes import moved_affine, save_nifti, synthetic_volume

from alzstage.config import NeuroPreprocessParams, Params, load_params
from alzstage.neuro.preprocess import REFERENCE_PARAMS, STEPS, Preprocessed, preprocess_volume
from alzstage.neuro.qc import rule_failure, volume_rules
from alzstage.neuro.slices import slice_ncc

# Quality bars of --compare (docs/neuro.md#speed-and-fidelity).
MIN_SLICE_NCC = 0.98
MAX_SCORE_DELTA = 0.01


@dataclass(frozen=True)
class Case:
    """One generated volume of --compare."""

    name: str
    degrees: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    scale: float
    bias: float = 0.15
    noise: float = 0.0
    atrophy: float = 0.0
    fov_mm: int = 0  # >0 pads, <0 crops every side of the 16 mm margin by this much
    flip_x: bool = False  # stored LAS: loading must reorient it
    nan_voxels: int = 0  # QC: finite_voxels fails
    seed: int = 0


COMPARE_VOLUMES = (
    Case("typical", (4.1, -6.3, 2.2), (5.0, -3.1, 7.4), 1.02, seed=1),
    Case(
        "wide field of view, noisy",
        (-7.5, 3.0, -5.2), (-6.0, 8.0, 2.5), 0.97, bias=0.2, noise=0.03, fov_mm=24,
    ),
    Case(
        "large pose, smaller head, atrophy, strong bias",
        (12.0, -10.0, 15.0), (12.0, -10.0, 8.0), 1.08, bias=0.3, noise=0.03, atrophy=0.3,
    ),
    Case(
        "larger head, tight crop, stored LAS",
        (-6.0, 4.0, -10.0), (-8.0, 6.0, -4.0), 0.9, bias=0.1, fov_mm=-12, flip_x=True,
    ),
    Case("NaN voxels (QC rejects)", (3.0, 5.0, -4.0), (2.0, -5.0, 3.0), 1.0, nan_voxels=40),
    Case("upside down (QC rejects)", (180.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, bias=0.1),
)  # fmt: skip


def make_volume(case: Case, path: Path, voxel_mm: float = 1.0) -> tuple[Path, np.ndarray]:
    """Write ``case`` as a NIfTI; returns (path, subject -> template truth)."""
    truth = moved_affine(case.degrees, case.shift_mm, case.scale)
    data, affine = synthetic_volume(
        truth, resolution=voxel_mm, bias=case.bias, noise=case.noise, atrophy=case.atrophy,
        seed=case.seed,
    )  # fmt: skip
    if case.fov_mm > 0:
        pad = round(case.fov_mm / voxel_mm)
        data = np.pad(data, pad)
        affine = affine.copy()
        affine[:3, 3] -= pad * voxel_mm
    elif case.fov_mm < 0:
        cut = round(-case.fov_mm / voxel_mm)
        data = np.ascontiguousarray(data[cut:-cut, cut:-cut, cut:-cut])
        affine = affine.copy()
        affine[:3, 3] += cut * voxel_mm
    dtype: Any = np.int16
    if case.nan_voxels:
        data = data.copy()
        rng = np.random.default_rng(case.seed)
        flat = rng.choice(data.size, case.nan_voxels, replace=False)
        data.reshape(-1)[flat] = np.nan
        dtype = np.float32  # int16 cannot hold NaN
    return save_nifti(path, data, affine, flip_x=case.flip_x, dtype=dtype), truth


def registration_error_mm(matrix: np.ndarray | None, truth: np.ndarray) -> float:
    """Mean distance (mm) over the template brain between where the registration and the
    true transform put each point (``truth`` maps subject to template points)."""
    from alzstage.neuro.register import mni152

    if matrix is None:
        return float("nan")
    tpl = mni152(2)
    ijk = np.argwhere(tpl.mask)[::5]
    points = np.c_[ijk, np.ones(len(ijk))] @ tpl.affine.T
    back = points @ (truth @ matrix).T  # template -> subject -> template: identity if exact
    return float(np.linalg.norm((back - points)[:, :3], axis=1).mean())


def verdict(qc: dict[str, Any], params: Params) -> tuple[str, ...]:
    """The validate.nifti rules a QC record breaks (empty: the volume passes)."""
    return tuple(
        rule.key
        for rule in volume_rules(params.validate_.nifti)
        if rule_failure(rule, qc.get(rule.column)) is not None
    )


def machine() -> str:
    """CPU model, AVX flags, cores and the load average: what a timing depends on."""
    model, flags = platform.processor() or "?", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        flags = set(re.findall(r"\bavx\S*", text))
    except OSError:
        pass
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    return (
        f"CPU {model}; {' '.join(sorted(flags)) or 'no avx'}; {os.cpu_count()} CPU(s), "
        f"SimpleITK {threads} thread(s); load average {load()}"
    )


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def timed(
    path: Path, pre: NeuroPreprocessParams, size: tuple[int, int]
) -> tuple[Preprocessed, float]:
    start = time.perf_counter()
    out = preprocess_volume(path, pre, size)
    return out, time.perf_counter() - start


def compare(args: argparse.Namespace, params: Params) -> int:
    fast = params.neuro.preprocess
    if args.registration_resolution is not None:
        fast = fast.model_copy(update={"registration_resolution": args.registration_resolution})
    ref = fast.model_copy(update=REFERENCE_PARAMS)
    size = params.base.image_size
    knobs = list(REFERENCE_PARAMS)
    print(f"# {machine()}")
    print(f"# {params_text(params_info(Path(__file__).resolve().parents[1]))}")
    print("# reference: " + ", ".join(f"{k}={getattr(ref, k)}" for k in knobs))
    print("# new:       " + ", ".join(f"{k}={getattr(fast, k)}" for k in knobs))
    cases = COMPARE_VOLUMES[: args.n]
    rows: list[dict[str, Any]] = []
    steps: dict[str, dict[str, list[float]]] = {"reference": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up outside the timing, both settings: nilearn's import and template
        # resampling, scikit-learn's import and ITK's first calls happen once per process.
        warm, _ = make_volume(COMPARE_VOLUMES[0], Path(tmp) / "warm.nii.gz", voxel_mm=3.0)
        for pre in (ref, fast):
            preprocess_volume(warm, pre, size)
        for i, case in enumerate(cases):
            path, truth = make_volume(case, Path(tmp) / f"sub-{i:02d}.nii.gz", args.voxel_mm)
            runs: dict[str, tuple[Preprocessed, float]] = {}
            order = (("reference", ref), ("new", fast))
            for _ in range(args.repeat):
                for label, pre in order if i % 2 == 0 else order[::-1]:
                    out, seconds = timed(path, pre, size)
                    if label not in runs or seconds < runs[label][1]:  # best of --repeat
                        runs[label] = (out, seconds)
            for label, (out, _) in runs.items():
                for step in STEPS:
                    steps[label].setdefault(step, []).append(out.timings.get(step, 0.0))
            (a, ta), (b, tb) = runs["reference"], runs["new"]
            ncc = slice_ncc(a.slices, b.slices)
            rows.append(
                {
                    "case": case.name,
                    "shape": a.qc["shape"],
                    "t_ref": ta,
                    "t_new": tb,
                    "ncc": float(ncc.min()),
                    "score_ref": a.qc["registration_score"],
                    "score_new": b.qc["registration_score"],
                    "qc_ref": verdict(a.qc, params),
                    "qc_new": verdict(b.qc, params),
                    "err_ref": registration_error_mm(a.transform, truth),
                    "err_new": registration_error_mm(b.transform, truth),
                    "brain_ml": (a.qc["brain_ml"], b.qc["brain_ml"]),
                    "tissue": max(
                        abs(a.qc[f"{t}_fraction"] - b.qc[f"{t}_fraction"])
                        for t in ("csf", "gm", "wm")
                    ),
                }
            )
            print(f"#   {case.name}: done, load average {load()}", flush=True)

    print()
    print(
        "| volume | shape | reference s | new s | ratio | min slice NCC | score ref / new "
        "| QC ref / new | error vs truth ref / new, mm | brain ml ref / new | max Δ tissue |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        qc = " / ".join(", ".join(v) or "pass" for v in (r["qc_ref"], r["qc_new"]))
        print(
            f"| {r['case']} | {r['shape']} | {r['t_ref']:.2f} | {r['t_new']:.2f} "
            f"| {r['t_ref'] / r['t_new']:.2f} | {r['ncc']:.4f} "
            f"| {r['score_ref']:.4f} / {r['score_new']:.4f} | {qc} "
            f"| {r['err_ref']:.2f} / {r['err_new']:.2f} "
            f"| {r['brain_ml'][0]:.0f} / {r['brain_ml'][1]:.0f} | {r['tissue']:.4f} |"
        )
    print()
    print("| step | reference mean s | new mean s |")
    print("|---|---|---|")
    for step in STEPS:
        print(
            f"| {step} | {statistics.mean(steps['reference'][step]):.2f} "
            f"| {statistics.mean(steps['new'][step]):.2f} |"
        )
    t_ref = statistics.mean(r["t_ref"] for r in rows)
    t_new = statistics.mean(r["t_new"] for r in rows)
    # A volume whose registration fails the score rule in the reference (upside down)
    # ends in an arbitrary local optimum in both runs: where it ends and its slices say
    # nothing, only that both reject it. The NCC and score bars hold for the others.
    registered = [r for r in rows if "registration_quality" not in r["qc_ref"]]
    min_ncc = min((r["ncc"] for r in registered), default=float("nan"))
    max_delta = max((abs(r["score_new"] - r["score_ref"]) for r in registered), default=0.0)
    agree = sum(r["qc_ref"] == r["qc_new"] for r in rows)
    ok = min_ncc >= MIN_SLICE_NCC and max_delta <= MAX_SCORE_DELTA and agree == len(rows)
    print()
    ratios = [r["t_ref"] / r["t_new"] for r in rows]
    print(
        f"per volume: reference {t_ref:.2f} s, new {t_new:.2f} s, ratio of the means "
        f"{t_ref / t_new:.2f}; per-volume ratios {min(ratios):.2f}-{max(ratios):.2f}, "
        f"median {statistics.median(ratios):.2f}; best of {args.repeat} run(s) each"
    )
    print(
        f"quality over the {len(registered)} volume(s) the reference registers: min slice NCC "
        f"{min_ncc:.4f} (bar {MIN_SLICE_NCC}), max |Δ score| {max_delta:.4f} "
        f"(bar {MAX_SCORE_DELTA}); "
        f"QC verdicts agree on {agree}/{len(rows)}: {'PASS' if ok else 'FAIL'}"
    )
    print(f"# load average at the end {load()}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="volumes (default 3; --compare: 6)")
    ap.add_argument("--voxel-mm", type=float, default=1.0, help="input voxel size")
    ap.add_argument("--registration-resolution", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="reference settings vs params")
    ap.add_argument("--repeat", type=int, default=1, help="--compare: best of this many runs")
    ap.add_argument(
        "--threads", type=int, default=None, help="ITK/OpenMP threads (1: one core, as a worker)"
    )
    args = ap.parse_args()
    if args.threads is not None:
        # As src/alzstage/compute.py's single-threaded workers run it. Set before the
        # first OpenMP/BLAS use (scikit-learn is imported lazily, by the k-means).
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    root = Path(__file__).resolve().parents[1]
    params: Params = load_params(root / "params.yaml")
    warn_if_params_differ(params_info(root))  # neuro.preprocess comes from it
    if args.compare:
        args.n = len(COMPARE_VOLUMES) if args.n is None else args.n
        return compare(args, params)
    args.n = 3 if args.n is None else args.n
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

    print(f"# {machine()}")
    print(f"# {params_text(params_info(Path(__file__).resolve().parents[1]))}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
