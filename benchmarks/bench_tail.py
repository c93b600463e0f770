"""Fine-tune step on cached activations: which compute settings help on this machine?

Why: with the frozen trunk cached, every training epoch is the ResNet50 final block plus
the head on conv4 activations. This script times exactly that step under the settings
the performance issue asks to weigh, so each keep/drop decision rests on a measurement:

- float32 (what the train stage uses),
- ``mixed_bfloat16`` (Keras mixed precision; the CPU may have AVX512-BF16),
- XLA (``jit_compile=True``),
- TensorFlow thread pools (``--intra`` / ``--inter``; default: TensorFlow's choice).

    python benchmarks/bench_tail.py --samples 512 --epochs 3

Each setting runs in its own subprocess (precision policies and thread pools are
process-wide) on the same random activations; the figure is the steady epoch
(the first epoch pays for tracing). Settings are run in turn, ``--rounds`` times, and
the best of each is kept, so background load hurts all of them alike; CPU time per
image (process time, all threads) is printed too because it moves less than wall time
when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _child import run_child

SETTINGS = {
    "float32": {},
    "mixed_bfloat16": {"policy": "mixed_bfloat16"},
    "float32 + XLA": {"jit": True},
    "float32, 1 inter-op thread": {"inter": 1},
}


def child(spec: dict) -> dict:
    import numpy as np

    if spec.get("intra") or spec.get("inter"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(spec.get("intra") or 0)
        tf.config.threading.set_inter_op_parallelism_threads(spec.get("inter") or 0)
    import keras

    from alzstage.config import ModelParams
    from alzstage.model import network as build

    if spec.get("policy"):
        keras.mixed_precision.set_global_policy(spec["policy"])
    h, w = spec["input_size"]
    net = build.build_network(ModelParams(weights="none", input_size=[h, w]), 4, seed=0)
    trunk, tail = build.split_backbone(net.backbone, build.FINAL_BLOCK["resnet50"])
    net.set_trainable(tail.layers)
    rng = np.random.default_rng(0)
    shape = tuple(int(d) for d in trunk.output.shape[1:])
    a = rng.standard_normal((spec["samples"], *shape)).astype("float32")
    y = rng.integers(0, 4, spec["samples"])
    inp = keras.Input(shape)
    model = keras.Model(inp, net.head(tail(inp)))
    model.compile(
        keras.optimizers.Adam(1e-4),
        "sparse_categorical_crossentropy",
        jit_compile=bool(spec.get("jit")),
    )
    times: list[float] = []
    cpu: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    model.fit(a, y, batch_size=32, epochs=spec["epochs"], verbose=0, callbacks=[Timer()])
    steady = times[1:] or times
    steady_cpu = cpu[1:] or cpu
    return {
        "images_per_second": spec["samples"] / (sum(steady) / len(steady)),
        "cpu_ms_per_image": 1000 * sum(steady_cpu) / len(steady_cpu) / spec["samples"],
        "first_epoch_seconds": times[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--input-size", type=int, nargs=2, default=[112, 96])
    ap.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="settings to run")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print("RESULT " + json.dumps(child(json.loads(args._child))))
        return
    best: dict[str, float] = {}
    first: dict[str, float] = {}
    cpu: dict[str, float] = {}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            spec = {
                "samples": args.samples,
                "epochs": args.epochs,
                "input_size": args.input_size,
                **extra,
            }
            result = run_child([__file__, "--_child", json.dumps(spec)], env, name)
            best[name] = max(best.get(name, 0.0), result["images_per_second"])
            first[name] = min(first.get(name, 1e9), result["first_epoch_seconds"])
            cpu[name] = min(cpu.get(name, 1e9), result["cpu_ms_per_image"])
    base = best.get("float32") or next(iter(best.values()))
    print(
        f"\nResNet50 final block + head on cached activations, {args.samples} samples, "
        f"input {args.input_size}, batch 32, best of {args.rounds}; "
        f"load avg {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| setting | images/s per epoch | vs float32 | CPU ms per image "
        "| first epoch s (incl. tracing) |"
    )
    print("|---|---|---|---|---|")
    for name, ips in best.items():
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x | {cpu[name]:.1f} | {first[name]:.1f} |")


if __name__ == "__main__":
    main()
