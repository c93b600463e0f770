"""Roofline: how close the from-scratch train step comes to this CPU's float32 limit.

    nice -n 19 python benchmarks/bench_roofline.py --json-out roofline.json \\
        [--ttt-json ttt.json]   # also rate the time-to-target run's images/s

What it measures, in one process, with the TensorFlow build and thread settings the
training uses (``--intra``/``--inter`` as in bench_time_to_target):

1. FLOPs per image, counted from the network's layers (``_flops.py``): the compact
   ResNet of params.yaml (``model.widths``/``blocks``/``input_size``), every layer
   trainable.
2. Achievable GFLOP/s per shape: every distinct convolution of the network as
   ``tf.nn.conv2d`` and its two gradients (``Conv2DBackpropInput``/``Filter``), every
   dense layer as its three matmuls, at the training batch size; plus one large square
   matmul. The fastest of all these is the peak: the highest float32 rate this framework
   reached on this CPU (an upper bound measured, not a datasheet figure). Their FLOP-weighted
   combination is the rate the step could reach if it were nothing but these kernels
   running as fast as they run alone: the roofline of this network.
3. The train step itself (params.yaml's optimiser and loss): compute only, on one
   in-memory batch; the input pipeline alone (alzstage's ``batches`` with the online
   augmenter); and ``fit`` on that pipeline. What the step loses against the kernels is
   BatchNorm, ReLU, Add, pooling, the loss, the optimiser update and framework overhead;
   what ``fit`` loses against the step is the input pipeline.

Achieved GFLOP/s = train FLOPs per image x images/s. ``--profile DIR`` also writes a
TensorFlow profiler trace of a few train steps (open with TensorBoard's profile plugin).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from _flops import LayerCost, flops_summary, layer_costs
from _machine import flags_text, framework_info, machine_info, params_text, set_threads

REPO = Path(__file__).resolve().parents[1]
PEAK_MATMUL = 2048  # n of the n x n x n float32 matmul timed beside the network's kernels
KERNELS = ("forward", "input_grad", "weight_grad")


def best_seconds(fn: Any, repeats: int, warmup: int = 2) -> float:
    """Fastest wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The best, not the median: other work on the machine only ever slows a kernel down,
    and the roofline asks what the kernel can do.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def conv_kernels(shape: tuple, batch: int) -> dict[str, Any]:
    """Forward, input-gradient and filter-gradient ops of one convolution shape."""
    import tensorflow as tf

    h, w, c_in, kh, kw, stride, padding, c_out = shape
    x = tf.random.normal((batch, h, w, c_in))
    k = tf.random.normal((kh, kw, c_in, c_out))
    pad, strides = padding.upper(), [1, stride, stride, 1]
    dy = tf.random.normal(tf.nn.conv2d(x, k, strides, pad).shape)
    return {
        "forward": tf.function(lambda: tf.nn.conv2d(x, k, strides, pad)),
        "input_grad": tf.function(
            lambda: tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=k, out_backprop=dy, strides=strides, padding=pad
            )
        ),
        "weight_grad": tf.function(
            lambda: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(k), out_backprop=dy, strides=strides, padding=pad
            )
        ),
    }


def dense_kernels(shape: tuple, batch: int) -> dict[str, Any]:
    """The three matmuls of a dense layer: y = xW, dx = dy W^T, dW = x^T dy."""
    import tensorflow as tf

    n_in, n_out = shape
    x, w = tf.random.normal((batch, n_in)), tf.random.normal((n_in, n_out))
    dy = tf.random.normal((batch, n_out))
    return {
        "forward": tf.function(lambda: tf.matmul(x, w)),
        "input_grad": tf.function(lambda: tf.matmul(dy, w, transpose_b=True)),
        "weight_grad": tf.function(lambda: tf.matmul(x, dy, transpose_a=True)),
    }


def time_shapes(costs: list[LayerCost], batch: int, repeats: int) -> dict[tuple, dict]:
    """Seconds per batch of each kernel of each distinct (kind, shape)."""
    out: dict[tuple, dict] = {}
    for c in costs:
        key = (c.kind, c.shape)
        if key in out:
            continue
        kernels = (conv_kernels if c.kind == "conv" else dense_kernels)(c.shape, batch)
        out[key] = {name: best_seconds(fn, repeats) for name, fn in kernels.items()}
    return out


def peak_matmul_gflops(repeats: int) -> float:
    import tensorflow as tf

    n = PEAK_MATMUL
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    seconds = best_seconds(tf.function(lambda: tf.matmul(a, b)), repeats)
    return 2 * n**3 / seconds / 1e9


def layer_rows(costs: list[LayerCost], timings: dict, batch: int) -> list[dict]:
    """Per layer: FLOPs, each kernel's GFLOP/s alone, and its predicted share of a step."""
    rows = []
    for c in costs:
        t = timings[(c.kind, c.shape)]
        step = t["forward"] + t["weight_grad"] * c.trainable + t["input_grad"] * c.input_grad
        gflops = {k: c.forward * batch / v / 1e9 for k, v in t.items()}
        rows.append(
            {
                "layer": c.name,
                "kind": c.kind,
                "shape": list(c.shape),
                "forward_mflops_per_image": c.forward / 1e6,
                "train_mflops_per_image": c.train / 1e6,
                **{f"{k}_gflops": v for k, v in gflops.items()},
                "predicted_step_ms": 1000 * step,
            }
        )
    return rows


def compile_like_train(model: Any, params: Any) -> None:
    """The scratch recipe's optimiser (AdamW) and loss; the rate does not change speed."""
    import keras

    from alzstage.train.losses import make_loss

    sp = params.train.scratch
    optimizer = (
        keras.optimizers.AdamW(sp.learning_rate, weight_decay=sp.weight_decay)
        if sp.weight_decay
        else keras.optimizers.Adam(sp.learning_rate)
    )
    model.compile(optimizer=optimizer, loss=make_loss(params))


def step_images_per_second(
    model: Any, batch: int, size: tuple, steps: int, rounds: int = 3
) -> float:
    """``fit`` on one in-memory batch repeated: the train step with no input pipeline.

    Best of ``rounds`` timed runs of ``steps`` steps, like the kernels.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, *size, 1)).astype(np.float32)
    y = rng.integers(0, 4, batch)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()

    def run(n: int) -> None:
        model.fit(ds, epochs=1, steps_per_epoch=n, shuffle=False, verbose=0)

    run(3)  # trace and warm up
    return steps * batch / best_seconds(lambda: run(steps), rounds, warmup=0)


def pipeline_images_per_second(params: Any, n: int, model: Any | None) -> float:
    """alzstage's feed (``batches`` + online augmenter): alone, or into ``model.fit``.

    The second epoch is timed; the first pays for tracing.
    """
    import numpy as np

    from alzstage.train.feed import batches
    from alzstage.train.fit import online_augmenter

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *params.model.input_size), dtype=np.uint8)
    y = rng.integers(0, 4, n)
    sp = params.train.scratch
    augment = online_augmenter(params.augment, params.base.seed) if sp.online_augment else None
    ds = batches(x, y, params.train.batch_size, seed=0, augment=augment)
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        if model is None:
            for _batch in ds:
                pass
        else:
            model.fit(ds, epochs=1, shuffle=False, verbose=0)
        seconds.append(time.perf_counter() - t)
    return n / seconds[-1]


def profile_steps(model: Any, batch: int, size: tuple, logdir: Path) -> None:
    """A TensorFlow profiler trace of 10 compute-only train steps."""
    import tensorflow as tf

    tf.profiler.experimental.start(str(logdir))
    step_images_per_second(model, batch, size, 10, rounds=1)
    tf.profiler.experimental.stop()


def ttt_rates(path: Path, train_flops: int) -> list[dict]:
    """Each whole-network method of a bench_time_to_target JSON: images/s and GFLOP/s."""
    body = json.loads(path.read_text())
    out = []
    for protocol, entry in body["protocols"].items():
        for r in entry["results"]:
            if r.get("train_flops_per_image") != train_flops:
                continue  # another network (transfer) or another input size
            out.append(
                {
                    "protocol": protocol,
                    "method": r["label"],
                    "images_per_second": r["images_per_second"],
                    "gflops": r["images_per_second"] * train_flops / 1e9,
                }
            )
    return out


def measure(args: argparse.Namespace) -> dict:
    """Every figure of the roofline report, in this process."""
    from alzstage.config import load_params
    from alzstage.model.network import build_network

    params = load_params(REPO / "params.yaml")
    batch, size = params.train.batch_size, tuple(params.model.input_size)
    net = build_network(params.model, len(params.base.classes), params.base.seed)
    net.set_trainable(None)
    costs = layer_costs(net.model)
    flops = flops_summary(net.model)
    timings = time_shapes(costs, batch, args.repeats)
    rows = layer_rows(costs, timings, batch)
    compile_like_train(net.model, params)
    step_ips = step_images_per_second(net.model, batch, size, args.steps)
    if args.profile:
        profile_steps(net.model, batch, size, args.profile)
    return {
        "network": {
            "backbone": params.model.resolved_backbone,
            "widths": params.model.widths,
            "blocks": params.model.blocks,
            "input_size": list(size),
            "batch_size": batch,
            **flops,
        },
        "layers": rows,
        "peak_matmul_gflops": peak_matmul_gflops(args.repeats),
        "predicted_step_ms": sum(r["predicted_step_ms"] for r in rows),
        "step_images_per_second": step_ips,
        "pipeline_images_per_second": pipeline_images_per_second(params, args.images, None),
        "fit_images_per_second": pipeline_images_per_second(params, args.images, net.model),
        "framework": framework_info(),
    }


def print_report(body: dict) -> None:
    m, net, fw = body["machine"], body["network"], body["framework"]
    tf_per_image = net["train_flops_per_image"]
    batch = net["batch_size"]
    roof = tf_per_image * batch / (body["predicted_step_ms"] / 1000) / 1e9
    kernels = [r[f"{k}_gflops"] for r in body["layers"] for k in KERNELS]
    peak = max(body["peak_matmul_gflops"], *kernels)
    print(
        f"\nCPU: {m['cpu']['model']} ({flags_text(m['cpu'])}), {m['cores']} cores; load average "
        f"{m['load_average'][0]:.2f}; TensorFlow {fw['tensorflow']}, Keras {fw['keras']}; threads "
        f"intra-op {fw['intra_op_threads']}, inter-op {fw['inter_op_threads']} (0 = TensorFlow's "
        f"choice); commit {m['commit']}"
    )
    print(f"{params_text(m.get('params'))}\n")
    print(
        f"{net['backbone']} {net['widths']} x {net['blocks']}, input {net['input_size']}, batch "
        f"{batch}: {net['forward_flops_per_image'] / 1e6:.0f} MFLOP forward, "
        f"{tf_per_image / 1e6:.0f} MFLOP per training image (conv + dense); "
        f"{net['elementwise_elements_per_image'] / 1e6:.2f} M BatchNorm/ReLU/Add outputs\n"
    )
    print(
        "| layer | shape (h, w, c_in, kh, kw, stride, pad, c_out) | train MFLOP/image "
        "| forward GFLOP/s | input-grad GFLOP/s | weight-grad GFLOP/s | predicted ms/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in body["layers"]:
        print(
            f"| {r['layer']} | {tuple(r['shape'])} | {r['train_mflops_per_image']:.1f} | "
            f"{r['forward_gflops']:.1f} | {r['input_grad_gflops']:.1f} | "
            f"{r['weight_grad_gflops']:.1f} | {r['predicted_step_ms']:.2f} |"
        )
    print()
    print_rates(body, roof, peak)


def print_rates(body: dict, roof: float, peak: float) -> None:
    """Achieved GFLOP/s of each measured path against the two ceilings."""
    tf_per_image = body["network"]["train_flops_per_image"]
    batch = body["network"]["batch_size"]
    step_ms = 1000 * batch / body["step_images_per_second"]
    print(
        f"- peak: {peak:.1f} GFLOP/s, the fastest float32 kernel measured (the "
        f"{PEAK_MATMUL}^3 matmul ran at {body['peak_matmul_gflops']:.1f})"
    )
    print(
        f"- roofline of this network (its conv/dense kernels at their own speed): "
        f"{roof:.1f} GFLOP/s, {body['predicted_step_ms']:.1f} ms per step"
    )
    rates = [
        ("train step, compute only", body["step_images_per_second"]),
        ("fit on alzstage's feed (batches + online augmentation)", body["fit_images_per_second"]),
        *[
            (f"time-to-target {t['protocol']}: {t['method']}", t["images_per_second"])
            for t in body.get("ttt", [])
        ],
    ]
    print("\n| path | images/s | GFLOP/s | of roofline | of peak |")
    print("|---|---|---|---|---|")
    for name, ips in rates:
        g = ips * tf_per_image / 1e9
        print(f"| {name} | {ips:.1f} | {g:.1f} | {g / roof:.0%} | {g / peak:.0%} |")
    print(
        f"\n- the step takes {step_ms:.1f} ms against {body['predicted_step_ms']:.1f} ms of "
        "conv/dense kernels: the rest is BatchNorm, ReLU, Add, pooling, loss, optimiser "
        "update and framework overhead"
    )
    print(
        f"- the input pipeline alone delivers {body['pipeline_images_per_second']:.1f} images/s "
        f"(the step needs {body['step_images_per_second']:.1f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per kernel")
    ap.add_argument("--steps", type=int, default=30, help="timed train steps")
    ap.add_argument("--images", type=int, default=512, help="images per pipeline epoch")
    ap.add_argument("--intra", type=int, help="TensorFlow intra-op threads (default: its choice)")
    ap.add_argument("--inter", type=int, help="TensorFlow inter-op threads (default: its choice)")
    ap.add_argument("--ttt-json", type=Path, help="a bench_time_to_target --json-out to rate")
    ap.add_argument("--profile", type=Path, help="write a profiler trace of 10 steps here")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--from-json", type=Path, help="print the report of a saved run")
    args = ap.parse_args()
    if args.from_json:
        print_report(json.loads(args.from_json.read_text()))
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    set_threads(args.intra, args.inter)
    body = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(REPO)}
    body.update(measure(args))
    if args.ttt_json:
        body["ttt"] = ttt_rates(args.ttt_json, body["network"]["train_flops_per_image"])
    if args.json_out:
        args.json_out.write_text(json.dumps(body, indent=2))
    print_report(body)


if __name__ == "__main__":
    main()
