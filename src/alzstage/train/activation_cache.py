"""On-disk cache of frozen-trunk activations, keyed by everything that determines them.

The frozen part of the backbone is the most expensive thing the train stage computes,
and a sweep over learning rates, epochs, head size or class weights recomputes exactly
the same activations every time. The key is a digest of:

- the trunk's actual weight values (so ``model.weights``, the seed that draws random
  weights, and the Keras/TF initialisers are all covered without trusting any of them),
- the trunk's architecture and the preprocessing mode (``model.backbone``, the cut),
- the exact uint8 input array (so ``model.input_size``, every ``augment`` param and the
  data itself are covered: a different augmentation is different bytes).

Anything else changing the activations would have to change one of these, so a hit is
always the same tensor the trunk would compute now. Entries live under
``.cache/alzstage/activations`` (git-ignored, like DVC's own cache); the newest
``max_entries`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def model_digest(model: Any, extra: dict[str, Any] | None = None) -> str:
    """sha256 of a Keras model's layer types, weight values and ``extra``.

    Layer and weight *names* are left out on purpose: Keras numbers auto-named layers
    per process (``input_layer_7``), which would make identical trunks miss.
    """
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    h.update(json.dumps([type(layer).__name__ for layer in _flat_layers(model)]).encode())
    for weight in model.weights:
        h.update(array_digest(np.asarray(weight.numpy())).encode())
    return h.hexdigest()


def _flat_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out += _flat_layers(layer) if hasattr(layer, "layers") else [layer]
    return out


@dataclass
class ActivationCache:
    """Load-or-compute for trunk activations; records hits and misses for the report."""

    root: Path
    max_entries: int = 4
    events: list[dict[str, Any]] = field(default_factory=list)

    def key(self, trunk_digest: str, inputs: np.ndarray) -> str:
        blob = f"{FORMAT_VERSION}:{trunk_digest}:{array_digest(inputs)}"
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get_or_compute(
        self, name: str, trunk_digest: str, inputs: np.ndarray, compute: Any
    ) -> np.ndarray:
        """Return cached activations for ``inputs``, or ``compute(inputs)`` and store them."""
        key = self.key(trunk_digest, inputs)
        target = self.path(key)
        if target.exists():
            try:
                out = np.load(target, allow_pickle=False)
            except (OSError, ValueError) as exc:  # a damaged entry is recomputed, not trusted
                self.events.append({"name": name, "key": key, "status": f"unreadable: {exc}"})
                target.unlink(missing_ok=True)
            else:
                os.utime(target)  # newest-used survives eviction
                self.events.append({"name": name, "key": key, "status": "hit"})
                return out
        out = compute(inputs)
        self._store(target, out)
        self.events.append({"name": name, "key": key, "status": "miss"})
        return out

    def _store(self, target: Path, array: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npy")
        try:
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.root.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.max_entries :]:
            old.unlink(missing_ok=True)
