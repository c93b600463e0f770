"""``alzstage predict`` over many files vs bare ``model.predict`` on the same tensors.

Why: batch prediction adds file decoding, resizing, the MLflow pyfunc wrapper,
temperature scaling and the per-file result table around the network. This shows what
that costs, so a regression in the prediction path is visible (target: at least 0.8x the
bare network's throughput over 500 images).

    python benchmarks/bench_predict.py                 # champion from the repo's registry
    python benchmarks/bench_predict.py --demo --n 500  # no pipeline run needed

Three figures, best of ``--repeats`` (a shared 2-core machine disturbs slower runs):

- bare: ``keras_model.predict`` on the already-decoded, already-resized batch;
- library: ``predict_files`` (what the CLI runs) on the files, model already loaded;
- CLI: the whole ``alzstage predict <folder> --format csv`` command in a fresh process,
  including Python start-up, imports, the registry lookup and model loading.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import resolve_model, slices


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="use a demo ResNet50 at 112x96")
    ap.add_argument("--n", type=int, default=500, help="images to predict")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-command figure")
    args = ap.parse_args()

    from alzstage.data.images import to_model_array
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import decode_image, predict_files

    uri, tracking, what = resolve_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slices"
        folder.mkdir()
        files = []
        for i, blob in enumerate(slices(args.n)):
            files.append(folder / f"slice_{i:04d}.png")
            files[-1].write_bytes(blob)

        model = LoadedModel(uri, [], (0, 0), tracking_uri=tracking)
        keras_model = model.keras_model
        x = np.stack([to_model_array(decode_image(f), model.size) for f in files])
        x4 = x[..., None].astype("float32")
        keras_model.predict(x4[:64], batch_size=64, verbose=0)  # trace + oneDNN warm-up
        predict_files(model, files[:64], 0.5)
        bare = best(lambda: keras_model.predict(x4, batch_size=64, verbose=0), args.repeats)
        lib = best(lambda: predict_files(model, files, 0.5), args.repeats)
        rows = [("bare keras_model.predict (decoded tensors)", bare), ("predict_files", lib)]
        if not args.no_cli:
            env = {
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "MLFLOW_TRACKING_URI": tracking,
                "MLFLOW_REGISTRY_URI": tracking,
            }
            cmd = [
                sys.executable,
                "-m",
                "alzstage.cli",
                "predict",
                str(folder),
                "--model",
                uri,
                "--format",
                "csv",
            ]
            root = Path(__file__).resolve().parents[1]

            def cli() -> None:
                subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=root)

            rows.append(("alzstage predict <folder> (whole command)", best(cli, args.repeats)))

    print(f"\n{args.n} images, {what}, load avg {os.getloadavg()[0]:.1f}\n")
    print("| path | seconds | images/s | vs bare |")
    print("|---|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} | {args.n / sec:.1f} | {bare / sec:.2f}x |")


if __name__ == "__main__":
    main()
