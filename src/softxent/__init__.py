"""softxent: fused softmax cross-entropy for PyTorch, exact, fast and lean, checked against a float64 oracle.

The ops are drop-in for ``torch.nn.functional``: each produces its gradient in the forward pass and the linear
heads never materialize the (N, C) logits. ``softxent.reference`` is the NumPy float64 oracle they are tested
against; ``softxent.nn`` holds the loss modules. ``SoftmaxClassifier`` and ``SigmoidClassifier`` (from
``softxent.estimators``, which needs the ``train`` extra) are scikit-learn classifiers trained by minibatch
SGD on these ops; ``softxent`` on the command line trains, applies and evaluates them.

The public names are imported on first use (PEP 562, as SciPy and scikit-image do): ``import softxent`` and
``softxent --help`` do not load torch, and the estimators load scikit-learn only when used.
``from softxent import *`` leaves the estimators out where the ``train`` extra is not installed.
"""

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from importlib.util import find_spec as _find_spec

try:
    __version__ = _version("softxent")
except _PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_LAZY = {
    "binary_cross_entropy_with_logits": "softxent.functional",
    "cross_entropy": "softxent.functional",
    "linear_binary_cross_entropy": "softxent.functional",
    "linear_cross_entropy": "softxent.functional",
    "LogProbs": "softxent.llm",
    "distillation_loss": "softxent.llm",
    "linear_distillation_loss": "softxent.llm",
    "linear_log_probs": "softxent.llm",
    "log_probs": "softxent.llm",
    "SigmoidClassifier": "softxent.estimators",
    "SoftmaxClassifier": "softxent.estimators",
}
_ESTIMATORS = ("SigmoidClassifier", "SoftmaxClassifier")
# The modules of the `train` extra that softxent.estimators imports.
_ESTIMATOR_MODULES = ("scipy", "sklearn", "safetensors")


def _train_extra_installed() -> bool:
    """Whether the estimators' dependencies are installed (found without importing them)."""
    return all(_find_spec(module) is not None for module in _ESTIMATOR_MODULES)


def __getattr__(name: str) -> object:
    """A public function or estimator, or a submodule (``softxent.nn``), imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("__") or _find_spec(f"softxent.{name}") is None:
            raise AttributeError(f"module 'softxent' has no attribute {name!r}")
        return _import_module(f"softxent.{name}")
    try:
        value = getattr(_import_module(module), name)
    except ModuleNotFoundError as error:
        if name not in _ESTIMATORS:
            raise
        raise ModuleNotFoundError(
            f"softxent.{name} needs the 'train' extra (missing module {error.name!r}): "
            "pip install 'softxent[train]'",
            name=error.name,
        ) from error
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API only (helpers and imports of this module are not part of it)."""
    return sorted(__all__)


__all__ = [
    *(_ESTIMATORS if _train_extra_installed() else ()),
    "LogProbs",
    "__version__",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "distillation_loss",
    "linear_binary_cross_entropy",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "log_probs",
    "nn",
    "reference",
]
