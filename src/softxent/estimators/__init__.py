"""scikit-learn classifiers trained by minibatch SGD on softxent's fused losses (in ``_base`` until the
package is split into its modules)."""

from softxent.estimators._base import (
    Checkpoint,
    DivergenceWarning,
    SigmoidClassifier,
    SoftmaxClassifier,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)

__all__ = [
    "Checkpoint",
    "DivergenceWarning",
    "SigmoidClassifier",
    "SoftmaxClassifier",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_model",
]
