"""Frozen-trunk inference speed by batch size: does a bigger inference batch help?

The train stage runs the frozen ResNet50 trunk (up to the final block) once over every
sample at ``train.batch_size``. Inference has no reason to share the training batch
size, so this measures the trunk alone at several batch sizes on random 112x96 images:

    python benchmarks/bench_frozen_forward.py --n 1536 --batch-sizes 32 128 256 --rounds 2

Each round runs every batch size once after a short tracing call; the first round
includes warm-up effects, so compare the later rounds.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1536, help="images per timed pass")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--input-size", type=int, nargs=2, default=[112, 96])
    args = ap.parse_args()

    import keras
    import numpy as np

    from alzstage.config import Params
    from alzstage.model.network import build_network, resolve_cut, split_backbone
    from alzstage.train.feed import predict_array

    h, w = args.input_size
    params = Params.model_validate({"model": {"weights": "none", "input_size": [h, w]}})
    net = build_network(params.model, 4, 0)
    trunk, _ = split_backbone(net.backbone, resolve_cut(params.model.backbone, "final_block"))
    inp = keras.Input((h, w, 1))
    trunk_fn = keras.Model(inp, trunk(net.preprocess(inp)))
    x = np.random.default_rng(0).integers(0, 256, (args.n, h, w), dtype=np.uint8)
    print(f"load average at start: {os.getloadavg()[0]:.1f}\n")
    print("| round | batch size | images/s |")
    print("|---|---|---|")
    for rnd in range(1, args.rounds + 1):
        for bs in args.batch_sizes:
            predict_array(trunk_fn, x[: bs * 2], bs)  # trace this batch shape first
            t0 = time.perf_counter()
            predict_array(trunk_fn, x, bs)
            print(f"| {rnd} | {bs} | {args.n / (time.perf_counter() - t0):.1f} |", flush=True)


if __name__ == "__main__":
    main()
