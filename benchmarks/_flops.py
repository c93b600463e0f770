"""Floating-point operations of a Keras network, counted from its layers' shapes.

Only convolutions and dense layers are counted (a multiply-add is 2 FLOPs): they are
the arithmetic a roofline compares with the machine's peak. BatchNorm, ReLU, Add and
pooling are memory-bound and are reported as the number of elements they write instead.

A training step costs, per counted layer, its forward FLOPs, the same again for the
weight gradient when the layer trains, and the same again for the input gradient when
any layer before it trains (the first convolution of a network trained from scratch has
no input gradient to compute). Layers are taken in the model's topological order, with
nested models (backbone, head) flattened in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ELEMENTWISE = ("BatchNormalization", "ReLU", "Activation", "Add")


@dataclass(frozen=True)
class LayerCost:
    """One convolution or dense layer: its shape (the microbenchmark key) and FLOPs."""

    name: str
    kind: str  # "conv" or "dense"
    # conv: (h_in, w_in, c_in, kh, kw, stride, padding, c_out); dense: (n_in, n_out)
    shape: tuple
    forward: int  # FLOPs per image
    trainable: bool
    input_grad: bool  # a trainable layer comes before it

    @property
    def train(self) -> int:
        return self.forward * (1 + int(self.trainable) + int(self.input_grad))


def flat_layers(model: Any) -> list[Any]:
    """Every leaf layer of ``model``, nested models expanded, in topological order."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(flat_layers(layer))
        else:
            out.append(layer)
    return out


def _conv_cost(layer: Any) -> tuple[tuple, int]:
    h_in, w_in, c_in = (int(d) for d in layer.input.shape[1:])
    h_out, w_out, c_out = (int(d) for d in layer.output.shape[1:])
    kh, kw = layer.kernel_size
    groups = getattr(layer, "groups", 1)
    shape = (h_in, w_in, c_in, kh, kw, layer.strides[0], layer.padding, c_out)
    return shape, 2 * h_out * w_out * c_out * kh * kw * (c_in // groups)


def layer_costs(model: Any) -> list[LayerCost]:
    """Conv2D and Dense layers of a freshly built ``model`` (each layer called once)."""
    import keras

    costs: list[LayerCost] = []
    trained_before = False
    for layer in flat_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            shape, flops = _conv_cost(layer)
            kind = "conv"
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = (int(d) for d in layer.kernel.shape)
            shape, flops, kind = (n_in, n_out), 2 * n_in * n_out, "dense"
        else:
            continue
        costs.append(LayerCost(layer.name, kind, shape, flops, layer.trainable, trained_before))
        trained_before = trained_before or layer.trainable
    return costs


def elementwise_elements(model: Any) -> int:
    """Output elements per image of BatchNorm, ReLU and Add layers (memory-bound work)."""
    total = 0
    for layer in flat_layers(model):
        if type(layer).__name__ in ELEMENTWISE:
            n = 1
            for d in layer.output.shape[1:]:
                n *= int(d)
            total += n
    return total


def flops_summary(model: Any) -> dict:
    """Forward and training-step FLOPs per image, and the memory-bound element count."""
    costs = layer_costs(model)
    return {
        "forward_flops_per_image": sum(c.forward for c in costs),
        "train_flops_per_image": sum(c.train for c in costs),
        "elementwise_elements_per_image": elementwise_elements(model),
        "counted_layers": len(costs),
    }
