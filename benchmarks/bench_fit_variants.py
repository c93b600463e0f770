"""Training images/s of the default recipe's ``fit`` under speed techniques, A/B in one process.

    python benchmarks/bench_fit_variants.py \\
        --archive ../shared/datasets/alzheimers-dataset-4-class-of-images.zip --work .cache/ttt

The training split of the subject protocol (alzstage's own download, validate, decode and
split code, as ``bench_time_to_target`` prepares it) is decoded at ``model.input_size``.
Each variant gets a fresh network and its own input pipeline (``feed.batches`` with the
online augmenter), one untimed epoch to trace, then ``--rounds`` epochs timed
round-robin across variants, so load on the machine hits every variant alike. Medians
and the ratio to the first variant (params.yaml as committed) are printed with the CPU
flags. Quality is not measured here: a variant that wins on speed still needs the 5-fold
CV (docs/models.md) before it becomes the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _machine import flags_text, machine_info, params_text
from bench_time_to_target import harness_params, labels_of, prepare_project, split_rows

# name -> (batch size or None for params.yaml's, jit_compile, dtype policy, steps_per_execution)
VARIANTS: dict[str, tuple[int | None, bool, str, int]] = {
    "params.yaml": (None, False, "float32", 1),
    "batch 32": (32, False, "float32", 1),
    "batch 128": (128, False, "float32", 1),
    "XLA jit_compile": (None, True, "float32", 1),
    "mixed_bfloat16": (None, False, "mixed_bfloat16", 1),
    "steps_per_execution 8": (None, False, "float32", 8),
}


def build(params: Any, variant: tuple[int | None, bool, str, int], x: Any, y: Any) -> tuple:
    """A fresh compiled network and its training pipeline, traced by one untimed epoch."""
    import keras

    from alzstage.model.network import build_network
    from alzstage.train.feed import batches
    from alzstage.train.fit import online_augmenter
    from alzstage.train.losses import make_loss

    batch, jit, policy, spe = variant
    keras.mixed_precision.set_global_policy(policy)
    try:
        net = build_network(params.model, len(params.base.classes), params.base.seed)
        net.set_trainable(None)
        sp = params.train.scratch
        net.model.compile(
            optimizer=keras.optimizers.AdamW(sp.learning_rate, weight_decay=sp.weight_decay),
            loss=make_loss(params),
            jit_compile=jit,
            steps_per_execution=spe,
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    augment = online_augmenter(params.augment, params.base.seed)
    ds = batches(x, y, batch or params.train.batch_size, params.base.seed, augment=augment)
    t = time.perf_counter()
    net.model.fit(ds, epochs=1, verbose=0)
    return net.model, ds, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, required=True, help="Kaggle-layout zip")
    ap.add_argument("--work", type=Path, default=Path(".cache/ttt"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import os

    from alzstage.config import parse_params
    from alzstage.data.images import load_batch

    raw = harness_params(args.archive, "subject", "scratch", 30, None, {})
    project = args.work / "project"
    prepare_project(raw, project)
    df = split_rows(raw, project)
    params = parse_params(raw)
    train = df[df["split"] == "train"]
    x = load_batch([project / "data" / "raw" / p for p in train["path"]], params.model.input_size)
    y = labels_of(train.to_dict("records"), params.base.classes)
    built = {name: build(params, v, x, y) for name, v in VARIANTS.items()}
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (model, ds, _) in built.items():
            t = time.perf_counter()
            model.fit(ds, epochs=1, verbose=0)
            rates[name].append(len(x) / (time.perf_counter() - t))
    base = statistics.median(rates["params.yaml"])
    machine = machine_info(Path(__file__).resolve().parents[1])
    print(
        f"\nCPU: {machine['cpu']['model']} ({flags_text(machine['cpu'])}), {machine['cores']} "
        f"cores; load average {os.getloadavg()[0]:.2f}; {len(x):,} training images at "
        f"{params.model.input_size[0]}x{params.model.input_size[1]}, params.yaml batch "
        f"{params.train.batch_size}"
    )
    print(f"{params_text(machine['params'])}\n")
    print("| variant | first epoch s | images/s median (min-max) | vs params.yaml |")
    print("|---|---|---|---|")
    out = {}
    for name, r in rates.items():
        med = statistics.median(r)
        out[name] = {"first_epoch_seconds": built[name][2], "images_per_second": r}
        print(
            f"| {name} | {built[name][2]:.1f} | {med:,.0f} ({min(r):,.0f}-{max(r):,.0f}) | "
            f"{med / base:.2f}x |"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "variants": out}, indent=1))


if __name__ == "__main__":
    main()
