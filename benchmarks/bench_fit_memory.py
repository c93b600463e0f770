"""Peak RSS of Keras ``fit``/``predict`` on a large in-memory array, and of alzstage's feed.

Why alzstage's train stage feeds Keras one batch at a time: given a NumPy array, Keras
copies it whole (about twice) before the first step. Each mode runs in a fresh process
on a random float32 array shaped like the cached conv4 activations of 8,196 samples
(7x6x1024, 1.3 GB) with a one-layer model, so the peak is the feeding alone.

    python benchmarks/bench_fit_memory.py            # all modes, one table
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

MODES = ("array-fit", "array-predict", "batches-fit", "predict_array")


def child(mode: str, n: int) -> None:
    import keras
    import numpy as np

    from alzstage.train.feed import batches, predict_array

    a = np.random.default_rng(0).random((n, 7, 6, 1024), dtype=np.float32)
    y = np.arange(n) % 4
    model = keras.Sequential(
        [
            keras.Input((7, 6, 1024)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    if mode == "array-fit":
        model.fit(a, y, batch_size=32, epochs=1, verbose=0)
    elif mode == "array-predict":
        model.predict(a, batch_size=32, verbose=0)
    elif mode == "batches-fit":
        model.fit(batches(a, y, 32, seed=0), epochs=1, shuffle=False, verbose=0)
    else:
        predict_array(model, a, 32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"RESULT {a.nbytes / 2**30:.2f} {peak:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8196)
    ap.add_argument("--_child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args._child, args.samples)
        return
    print("| feed | array GB | peak RSS GB |\n|---|---|---|")
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, __file__, "--_child", mode, "--samples", str(args.samples)],
            capture_output=True,
            text=True,
            env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ},
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{mode} failed:\n{proc.stderr[-2000:]}")
        size, peak = line[-1].split()[1:]
        print(f"| {mode} | {size} | {peak} |")


if __name__ == "__main__":
    main()
