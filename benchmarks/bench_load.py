"""Load test of ``alzstage serve``: does memory stay bounded under hostile requests? (not a test)

Why: issue 16 measured the server before its limits were per-request and per-header:
a 249 KB ``.nii.gz`` (a 640^3 volume) took it from 1.8 to 8.4 GB resident; four requests
of 64 PNGs of 4096^2 (1 MB on the wire each) peaked at 5.5 GB, and 4.3 GB stayed held
afterwards. This harness replays those requests, and the largest ones the limits admit,
against the real command, and checks the targets the issue set:

    any single admitted request       < 2 GB resident
    8 concurrent hostile requests     < 4 GB resident
    /health                           answered throughout
    after the load                    within 20% of the idle resident size

    python benchmarks/bench_load.py                 # ~3-5 minutes on 2 busy cores
    python benchmarks/bench_load.py --no-volume     # skip the largest-volume request
    python benchmarks/bench_load.py --json-out load.json

The server is ``alzstage serve`` (the CLI, default limits) on 127.0.0.1 in its own
process, serving the tests' demo champion (:func:`alzstage.serve.demo.ensure_demo_champion`:
the project's network with random weights, the production pyfunc, input check and leak
guard). Its resident size (RSS) is sampled every 50 ms by psutil; each phase reports its
peak. The request count is fixed and every request has a timeout, so the run is bounded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _machine import flags_text, machine_info, params_text
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MB = 2**20
TARGET_SINGLE_MB = 2048
TARGET_CONCURRENT_MB = 4096
TARGET_AFTER = 0.20


# --------------------------------------------------------------------------- inputs


def png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def largest_slices(n: int, seed: int = 7) -> list[bytes]:
    """Real-like demo slices upscaled to 4096 x 3464: in distribution, so they reach the
    network and Grad-CAM, and together exactly within the default request pixel budget."""
    from alzstage.data.demo import generate_demo

    with tempfile.TemporaryDirectory() as tmp:
        records = generate_demo(
            Path(tmp),
            classes=["a", "b"],
            subjects_per_class=[1, 1],
            slices_per_subject=max(1, n // 2),
            image_size=(208, 176),
            seed=seed,
        )
        out = []
        for r in records[:n]:
            with Image.open(r.path) as im:
                big = im.convert("L").resize((3464, 4096), Image.Resampling.BICUBIC)
            out.append(png(np.asarray(big)))
    return out


def blank_4096() -> bytes:
    """Issue 16's bomb image: a 4096^2 PNG of zeros, 16 KB on the wire, 16 MB decoded."""
    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG")
    return buf.getvalue()


def volume_bomb(shape: tuple[int, int, int] = (640, 640, 640)) -> bytes:
    """Issue 16's volume: a valid header declaring ``shape`` uint8, zeros inside (~250 KB)."""
    import zlib

    import nibabel as nib

    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)).header
    header.set_data_shape(shape)
    header.set_data_offset(352)
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(16 * MB)
    parts = [z.compress(header.binaryblock + b"\x00" * 4)]
    left = int(np.prod(shape))
    while left > 0:
        parts.append(z.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(z.flush())
    return b"".join(parts)


def largest_volume(voxel_mm: float = 0.7) -> tuple[bytes, tuple[int, ...]]:
    """The MNI152 T1 (nilearn's, 1 mm) resampled to ``voxel_mm``: a real head at HCP-like
    resolution, 25 M voxels at 0.7 mm, under the 2^25-voxel cap (int16 .nii.gz)."""
    import gzip

    import nibabel as nib
    from scipy import ndimage

    from alzstage.neuro.register import mni152

    t1 = mni152(1)
    fine = ndimage.zoom(t1.t1, 1.0 / voxel_mm, order=1)
    affine = t1.affine.copy()
    affine[:3, :3] *= voxel_mm
    data = np.rint(fine / max(float(fine.max()), 1e-6) * 1000).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    return gzip.compress(img.to_bytes(), compresslevel=6), data.shape


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sampler:
    """RSS of one process every ``interval`` s, with the peak per named phase."""

    pid: int
    interval: float = 0.05
    phase: str = "start"
    peaks: dict[str, int] = field(default_factory=dict)
    last: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                self.last = proc.memory_info().rss
            except psutil.Error:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.last)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class HealthProbe:
    """GET /health every 0.2 s while the load runs: every answer, the slowest."""

    url: str
    n: int = 0
    failures: int = 0
    worst_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import requests

        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                ok = requests.get(f"{self.url}/health", timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            self.n += 1
            self.failures += 0 if ok else 1
            self.worst_s = max(self.worst_s, time.perf_counter() - t)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()


def post(url: str, path: str, files: list[tuple[str, bytes]], timeout: float) -> str:
    """One multipart POST; its status (``timeout`` / ``error`` when there was none)."""
    import requests

    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    try:
        return str(requests.post(f"{url}{path}", files=parts, timeout=timeout).status_code)
    except requests.Timeout:
        return "timeout"
    except requests.RequestException:
        return "error"


@dataclass
class Phase:
    name: str
    requests: int
    statuses: Counter
    seconds: float
    peak_mb: float
    target_mb: float | None


def run_phase(
    name: str,
    url: str,
    sampler: Sampler,
    jobs: list[tuple[str, list[tuple[str, bytes]]]],
    timeout: float,
    target_mb: float | None,
) -> Phase:
    """All ``jobs`` (path, files) at once, each on its own connection."""
    sampler.phase = name
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        statuses = list(pool.map(lambda j: post(url, j[0], j[1], timeout), jobs))
    seconds = time.perf_counter() - start
    time.sleep(0.2)  # the sampler's last look at this phase
    return Phase(name, len(jobs), Counter(statuses), seconds, sampler.peaks[name] / MB, target_mb)


def settle(sampler: Sampler, seconds: float) -> float:
    """Median RSS (MB) over the last half of ``seconds`` of quiet."""
    time.sleep(seconds / 2)
    values = []
    for _ in range(int(seconds / 2 / 0.1)):
        values.append(sampler.last)
        time.sleep(0.1)
    return float(np.median(values)) / MB


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--no-volume", action="store_true", help="skip the largest-volume request")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per request")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument(
        "--demo-root",
        type=Path,
        default=ROOT / ".cache" / "alzstage" / "bench-load-demo",
        help="where the demo champion is built once and reused",
    )
    args = ap.parse_args()

    machine = machine_info(ROOT)
    cpu = machine["cpu"]
    print(f"CPU: {cpu['model']} ({flags_text(cpu)}); {machine['cores']} cores")
    print(params_text(machine["params"]))
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in machine['load_average'])}")

    from alzstage.serve.demo import ensure_demo_champion

    demo = ensure_demo_champion(args.demo_root)
    print("preparing inputs...", flush=True)
    big = largest_slices(4)
    blank = blank_4096()
    bomb = volume_bomb()
    volume, volume_shape = (b"", ()) if args.no_volume else largest_volume()
    warm_volume, _ = largest_volume(2.0)

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALZSTAGE_"))}
    env.update(ALZSTAGE_ROOT=str(work), MLFLOW_TRACKING_URI=demo.tracking_uri)
    cmd = [str(BIN / "alzstage"), "serve", "--model", demo.uri, "--port", str(port)]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sampler = Sampler(server.pid)
    sampler.start()
    probe = HealthProbe(url)
    phases: list[Phase] = []
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"alzstage serve did not start:\n{(work / 'serve.log').read_text()}")
            time.sleep(0.5)
        # Warm up like a first user: load the model, run the network and Grad-CAM, and
        # one small volume, so that lazy imports (nilearn, SimpleITK, scikit-learn) and
        # the MNI template cache are in the idle figure and not counted as "held".
        sampler.phase = "warm-up"
        one = png(np.asarray(Image.open(io.BytesIO(big[0])).resize((176, 208))))
        post(url, "/predict?gradcam=true", [("one.png", one)], args.timeout)
        requests.get(f"{url}/model", timeout=60)
        post(url, "/predict/volume", [("small.nii.gz", warm_volume)], args.timeout)
        idle_mb = settle(sampler, 6.0)
        print(f"idle after warm-up: {idle_mb:.0f} MB resident", flush=True)

        probe.start()
        print("phase: largest admitted image request...", flush=True)
        files = [(f"big{i}.png", b) for i, b in enumerate(big)]
        phases.append(
            run_phase(
                "1 request: 4 x 4096x3464 slices, Grad-CAM",
                url,
                sampler,
                [("/predict?gradcam=true", files)],
                args.timeout,
                TARGET_SINGLE_MB,
            )
        )
        if volume:
            print("phase: largest admitted volume...", flush=True)
            shape = "x".join(map(str, volume_shape))
            phases.append(
                run_phase(
                    f"1 request: {shape} volume (0.7 mm, {len(volume) / MB:.0f} MB gz)",
                    url,
                    sampler,
                    [("/predict/volume?gradcam=true", [("head.nii.gz", volume)])],
                    args.timeout,
                    TARGET_SINGLE_MB,
                )
            )
        print("phase: 8 concurrent hostile requests...", flush=True)
        # Issue 16's two attacks, mixed with the heaviest admitted requests, all at once.
        image_bomb = [(f"b{i}.png", blank) for i in range(64)]
        hostile = [("/predict?gradcam=true", image_bomb)] * 3
        hostile += [("/predict/volume", [("bomb.nii.gz", bomb)])] * 2
        hostile += [("/predict?gradcam=true", files)] * 2
        hostile += [("/predict/volume?gradcam=true", [("head.nii.gz", volume)])] if volume else []
        hostile += [("/predict?gradcam=true", image_bomb)] * (8 - len(hostile))
        n_bombs = sum(1 for _, f in hostile if f is image_bomb)
        phases.append(
            run_phase(
                f"8 at once: {n_bombs} x (64 blank PNG 4096^2), 2 x 640^3 .nii.gz, "
                f"2 x the largest slices{', 1 x the largest volume' if volume else ''}",
                url,
                sampler,
                hostile,
                args.timeout,
                TARGET_CONCURRENT_MB,
            )
        )
        probe.stop()
        sampler.phase = "after"
        after_mb = settle(sampler, 8.0)
    finally:
        probe.stop()
        sampler.stop()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()

    load = os.getloadavg()
    print()
    print(f"alzstage serve on 127.0.0.1, demo champion; commit {machine['commit']}")
    print(f"CPU: {cpu['model']}; flags: {flags_text(cpu)}; {machine['cores']} cores")
    print(params_text(machine["params"]))
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    rows = [("phase", "answers", "wall s", "peak RSS MB", "target", "met")]
    rows.append(("idle (model loaded, warmed up)", "", "", f"{idle_mb:.0f}", "", ""))
    for p in phases:
        answers = ", ".join(f"{n}x {s}" for s, n in sorted(p.statuses.items()))
        met = "yes" if p.target_mb is None or p.peak_mb < p.target_mb else "NO"
        target = f"< {p.target_mb:.0f}" if p.target_mb else ""
        rows.append((p.name, answers, f"{p.seconds:.1f}", f"{p.peak_mb:.0f}", target, met))
    health_ok = probe.failures == 0 and probe.n > 0
    rows.append(
        (
            "/health during the load",
            f"{probe.n - probe.failures} of {probe.n} OK",
            f"max {probe.worst_s:.2f}",
            "",
            "all OK",
            "yes" if health_ok else "NO",
        )
    )
    change = (after_mb - idle_mb) / idle_mb
    rows.append(
        (
            "after the load (8 s quiet)",
            "",
            "",
            f"{after_mb:.0f} ({change:+.0%} vs idle)",
            f"within {TARGET_AFTER:.0%}",
            "yes" if abs(change) <= TARGET_AFTER else "NO",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "load_average_end": list(load),
                    "idle_mb": idle_mb,
                    "after_mb": after_mb,
                    "phases": [{**p.__dict__, "statuses": dict(p.statuses)} for p in phases],
                    "health": {"n": probe.n, "failures": probe.failures, "worst_s": probe.worst_s},
                },
                indent=2,
            )
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
