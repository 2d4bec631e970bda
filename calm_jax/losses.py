"""Loss of decoder-only training: cross-entropy on target tokens, optional z-loss.

Normaliser: the sum of the loss weights (the number of target tokens when weights are 0/1), so
the loss is the mean cross-entropy per target token whatever the padding or packing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class LossOutput(NamedTuple):
  """Scalar loss and its parts.

  Attributes:
    loss: cross-entropy + z_loss * z-term, per target token (what is differentiated).
    cross_entropy: mean cross-entropy per target token.
    z_loss: mean of logsumexp(logits)^2 per target token (unscaled).
    accuracy: fraction of target tokens whose argmax is right.
    weight_sum: the normaliser (number of target tokens).
  """

  loss: Array
  cross_entropy: Array
  z_loss: Array
  accuracy: Array
  weight_sum: Array


def cross_entropy_loss(logits: Array, targets: Array, weights: Array,
                       z_loss: float = 0.0) -> LossOutput:
  """Weighted token cross-entropy.

  Args:
    logits: [B, T, V] float32.
    targets: [B, T] int target ids.
    weights: [B, T] loss weights (0 on inputs/prompt and padding).
    z_loss: coefficient of the z-loss (PaLM's 1e-4 keeps logits from drifting); 0 disables it.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  weights = weights.astype(logits.dtype)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  token_ce = log_z - target_logit
  weight_sum = jnp.sum(weights)
  denominator = jnp.maximum(weight_sum, 1.0)
  ce = jnp.sum(token_ce * weights) / denominator
  z = jnp.sum(jnp.square(log_z) * weights) / denominator
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * weights) / denominator
  return LossOutput(ce + z_loss * z, ce, z, accuracy, weight_sum)
