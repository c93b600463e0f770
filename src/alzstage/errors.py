"""Errors whose message is written for a person (what, where, how to fix).

They live in a module with no heavy imports so the CLI can catch them without loading
TensorFlow just to know the exception type.
"""


class WeightsError(RuntimeError):
    """``model.weights`` could not be honoured; never silently replaced by random weights."""
