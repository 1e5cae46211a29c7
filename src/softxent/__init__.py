"""softxent: fused softmax cross-entropy for PyTorch, exact, fast and lean, checked against a float64 oracle.

The ops are drop-in for ``torch.nn.functional``: each produces its gradient in the forward pass and the linear
heads never materialize the (N, C) logits. ``softxent.reference`` is the NumPy float64 oracle they are tested
against; ``softxent.nn`` holds the loss modules. ``SoftmaxClassifier`` and ``SigmoidClassifier`` (from
``softxent.estimators``, which needs the ``train`` extra) are scikit-learn classifiers trained by minibatch
SGD on these ops; ``softxent`` on the command line trains, applies and evaluates them.
"""

from importlib.metadata import PackageNotFoundError, version

from softxent import nn, reference
from softxent.functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    linear_binary_cross_entropy,
    linear_cross_entropy,
)

try:
    __version__ = version("softxent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_ESTIMATORS = ("SigmoidClassifier", "SoftmaxClassifier")


def __getattr__(name: str) -> object:
    """The estimators, imported on first use: they pull in scikit-learn, which the ops do not need."""
    if name in _ESTIMATORS:
        from softxent import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'softxent' has no attribute {name!r}")


__all__ = [
    "SigmoidClassifier",
    "SoftmaxClassifier",
    "__version__",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_binary_cross_entropy",
    "linear_cross_entropy",
    "nn",
    "reference",
]
