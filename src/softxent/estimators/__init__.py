r"""scikit-learn classifiers on softxent's losses, fitted by full-batch L-BFGS or minibatch SGD.

:class:`SoftmaxClassifier` is true multinomial softmax regression: one linear map z = Wx + b to all
classes at once, ŷ = softmax(z), trained on the cross-entropy with the gradient

.. math::
    \frac{∂ℓ}{∂W} = (ŷ - y)\,x^\top, \qquad \frac{∂ℓ}{∂b} = ŷ - y,

written down in closed form (:func:`softxent.ops.weighted.linear_cross_entropy_with_grads`: a few torch
calls a batch, no autograd for the head). scikit-learn's ``SGDClassifier``
offers only one-vs-rest for several classes. :class:`SigmoidClassifier` puts one sigmoid and one binary
cross-entropy on each label (multi-label problems, gradient σ(z) − y, in closed form too:
:func:`softxent.ops.weighted.linear_binary_cross_entropy_with_grads`). With ``hidden_layer_sizes`` both
become a small ReLU network under the same loss.

Both minimize, over minibatches B of the training set,

.. math::
    \frac{1}{|B|\,\bar s} \sum_{i \in B} s_i\,ℓ_i + \frac{α}{2} \sum_{\text{weights}} \|W\|^2

(s_i: sample weight times class weight, s̄ their mean over the training set, so that the objective is the
weighted mean and the step size does not depend on the scale of the weights; biases are not penalized)
with SGD and momentum, a learning-rate schedule and scikit-learn's stopping rules.

``fit`` and ``partial_fit`` train data-parallel when torch.distributed is initialized (under torchrun, or
in processes started by :func:`softxent.distributed.launch`) or when given a ``process_group``: every rank
passes the whole data, trains on its share of every minibatch, and one all-reduce per step sums the
gradients, so all ranks end with the same model as one process with the same batch size (within float
rounding); see :mod:`softxent.distributed._data_parallel`.

``save_model``/``load_model`` write and read a fitted estimator as one safetensors file with JSON metadata
in its header; ``Checkpoint``, ``save_checkpoint`` and ``load_checkpoint`` let a long fit resume after an
interruption.
"""

from softxent.estimators._base import DivergenceWarning
from softxent.estimators._classifiers import SigmoidClassifier, SoftmaxClassifier
from softxent.estimators._files import load_checkpoint, load_model, save_checkpoint, save_model
from softxent.estimators._format import Checkpoint

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
