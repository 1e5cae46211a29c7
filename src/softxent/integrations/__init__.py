"""Integrations of softxent's ops with other libraries, one module per library.

- :mod:`softxent.integrations.transformers`: Hugging Face causal LMs compute their training loss with the
  fused linear head (:func:`softxent.linear_cross_entropy`) instead of materializing the logits.
- :mod:`softxent.integrations.trl`: TRL's trainers compute their per-token log-probs, entropy and
  distillation divergences with :func:`softxent.linear_log_probs` and
  :func:`softxent.linear_distillation_loss` (``enable()`` / ``disable()``).

Importing this package imports none of those libraries; each module imports its library when it is used.
"""
