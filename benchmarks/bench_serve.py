"""Measure the REST API on CPU: single-image latency and batch throughput (not a test).

Why: ``POST /predict`` adds decoding, multipart parsing, JSON and (optionally) Grad-CAM
around the network; this script shows how much, against the network alone, so a
deployment can be sized and a regression in the serving path is visible.

    python benchmarks/bench_serve.py                  # champion from the repo's registry
    python benchmarks/bench_serve.py --demo           # no pipeline run needed
    python benchmarks/bench_serve.py --requests 100 --batches 1 8 32 64

The server is ``alzstage.serve.app`` under uvicorn in a *separate process* on 127.0.0.1
(as in production, so the client's work does not share its interpreter), with the model
loaded before timing starts. Inputs are 208x176 grayscale PNGs, the Kaggle slice size.
"bare" is ``keras_model.predict`` on the already-decoded, already-resized uint8 batch,
timed in this process *before* the server starts: the floor that serving overhead is
measured from. Batch figures are the best of ``--repeats`` runs, because on a shared
2-core machine the fastest run is the one least disturbed by other jobs; latency
percentiles are reported as measured (run when the machine is quiet).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import params_info, params_text, warn_if_params_differ
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

SERVER = """
import sys, uvicorn
from alzstage.serve.app import ServeSettings, create_app
uri, tracking, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = create_app(ServeSettings(model_uri=uri, tracking_uri=tracking, max_files=1024))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def slices(n: int, seed: int = 0) -> list[bytes]:
    """Distinct MRI-sized PNGs (an ellipse with noise), encoded once up front."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:208, 0:176]
    inside = ((yy - 104) / 88) ** 2 + ((xx - 88) / 70) ** 2 < 1
    out = []
    for _ in range(n):
        img = np.where(inside, 130 + rng.normal(0, 30, inside.shape), 0).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def resolve_model(args: argparse.Namespace) -> tuple[str, str, str]:
    """(model URI, tracking URI, description): the repo's champion, or a demo one."""
    import mlflow

    from alzstage.tracking import tracking_uri

    if not args.demo:
        from alzstage.config import Paths, load_params
        from alzstage.inference.predict import choose_model

        uri = tracking_uri(ROOT)
        try:
            # The champion of the dataset params.yaml configures, as `alzstage serve` picks.
            choice = choose_model(None, load_params(ROOT / "params.yaml"), Paths(ROOT))
            warn_if_params_differ(params_info(ROOT))  # data.source / data.name pick it
            name = choice.uri.removeprefix("models:/").removesuffix("@champion")
            mv = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
                name, "champion"
            )
            return choice.uri, uri, f"repo champion {name} v{mv.version}"
        except Exception:
            print("no champion in the repo's registry; using a demo model (see --demo)")
    from alzstage.serve.demo import ensure_demo_champion

    scratch = Path(tempfile.mkdtemp(prefix="alzstage-bench-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # ~200 MB of model files
    demo = ensure_demo_champion(scratch, input_size=(112, 96))
    return demo.uri, demo.tracking_uri, "demo ResNet50 112x96 (random weights)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="use a demo ResNet50 at 112x96")
    ap.add_argument("--requests", type=int, default=50, help="single-image requests to time")
    ap.add_argument("--gradcam-requests", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per batch size")
    args = ap.parse_args()

    import requests

    from alzstage.data.images import to_model_array
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import decode_image

    uri, tracking, what = resolve_model(args)
    data = slices(max([*args.batches, 8]))

    # Phase 1, before the server exists: the bare network in this process, on arrays
    # already decoded and resized, so nothing else competes for the two cores.
    model = LoadedModel(uri, [], (0, 0), tracking_uri=tracking)
    size = model.size
    keras_model = model.keras_model
    bare: dict[int, float] = {}
    for b in args.batches:
        x = np.stack([to_model_array(decode_image(d), size) for d in data[:b]])[..., None]
        x = x.astype("float32")
        for _ in range(3):  # warm-up: traces the function, fills oneDNN's primitive cache
            keras_model.predict(x, batch_size=64, verbose=0)
        bare[b] = min(
            _timed(lambda x=x, m=keras_model: m.predict(x, batch_size=64, verbose=0))
            for _ in range(args.repeats)
        )
    del model, keras_model
    gc.collect()

    # Phase 2: the API in its own process, called over loopback HTTP.
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, uri, tracking, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if session.get(f"{base}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("server did not start")
            time.sleep(0.2)
        t0 = time.perf_counter()
        session.get(f"{base}/model", timeout=300).raise_for_status()  # loads the model
        load_s = time.perf_counter() - t0

        def post(files: list[bytes], gradcam: bool = False) -> float:
            parts = [("files", (f"s{i}.png", b, "image/png")) for i, b in enumerate(files)]
            t = time.perf_counter()
            r = session.post(f"{base}/predict", files=parts, params={"gradcam": gradcam})
            elapsed = time.perf_counter() - t
            r.raise_for_status()
            return elapsed

        for _ in range(3):
            post(data[:1])
            post(data[:1], gradcam=True)
        single = [post([data[i % len(data)]]) for i in range(args.requests)]
        cam = [post([data[i % len(data)]], gradcam=True) for i in range(args.gradcam_requests)]
        rows = []
        for b in args.batches:
            for _ in range(3):  # warm-up for this batch shape, as for the bare side
                post(data[:b])
            api = min(post(data[:b]) for _ in range(args.repeats))
            rows.append((b, b / bare[b], b / api, api / bare[b]))
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\nalzstage serve benchmark: {what}, input {size[0]}x{size[1]}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}; model load on first /model: {load_s:.1f} s")  # fmt: skip
    print(f"{params_text(params_info(ROOT))}\n")
    print("single image, POST /predict (208x176 PNG)      p50 ms   p95 ms   mean ms")
    print(f"  without Grad-CAM (n={len(single):<3})                  "
          f"{pct(single, 50) * 1e3:7.1f}  {pct(single, 95) * 1e3:7.1f}  "
          f"{statistics.mean(single) * 1e3:7.1f}")  # fmt: skip
    print(f"  with Grad-CAM    (n={len(cam):<3})                  "
          f"{pct(cam, 50) * 1e3:7.1f}  {pct(cam, 95) * 1e3:7.1f}  "
          f"{statistics.mean(cam) * 1e3:7.1f}")  # fmt: skip
    print(
        "\nbatch throughput (best of repeats)   bare model.predict   POST /predict   "
        "API time / bare"
    )
    for b, bare_ips, api_ips, ratio in rows:
        print(f"  batch {b:<4}                          {bare_ips:9.1f} img/s    "
              f"{api_ips:7.1f} img/s      {ratio:5.2f}x")  # fmt: skip


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
