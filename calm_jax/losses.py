"""Loss of decoder-only training: cross-entropy on target tokens, optional z-loss.

Normaliser: the sum of the loss weights (the number of target tokens when weights are 0/1), so
the loss is the mean cross-entropy per target token whatever the padding or packing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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
  return _loss_output(_weighted_sums(logits, targets, weights), weights, z_loss)


def _weighted_sums(logits: Array, targets: Array, weights: Array) -> Array:
  """[3]: the weighted sums over tokens of cross-entropy, logsumexp(logits)^2 and argmax
  correctness (logits [..., V] in at least float32)."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  weights = weights.astype(logits.dtype)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(logits.dtype)
  return jnp.stack([jnp.sum((log_z - target_logit) * weights),
                    jnp.sum(jnp.square(log_z) * weights), jnp.sum(correct * weights)])


def _loss_output(sums: Array, weights: Array, z_loss: float) -> LossOutput:
  """The `LossOutput` of `_weighted_sums` over all tokens, normalised by the weights' sum."""
  weight_sum = jnp.sum(weights.astype(sums.dtype))
  ce, z, accuracy = sums / jnp.maximum(weight_sum, 1.0)
  return LossOutput(ce + z_loss * z, ce, z, accuracy, weight_sum)


class ChunkedHead(NamedTuple):
  """A model's output before its head, for `chunked_cross_entropy_loss`.

  Attributes:
    hidden: [B, T, D] the residual stream the head reads.
    project: `project(x [B, C, D]) -> [B, C, V]` float32 logits (final norm, output
      projection, soft-cap), a function of the same parameters.
    chunk_size: C, tokens per row whose logits exist at a time.
  """

  hidden: Array
  project: Callable[[Array], Array]
  chunk_size: int


def chunked_cross_entropy_loss(head: ChunkedHead, targets: Array, weights: Array,
                               z_loss: float = 0.0) -> LossOutput:
  """`cross_entropy_loss` of `head.project(head.hidden)`, never holding all of the logits.

  The sequence is cut into chunks of `head.chunk_size` positions (the batch axis is kept, so
  a batch sharded over devices stays sharded); each chunk's logits are computed, reduced to
  sums and dropped, and recomputed in the backward pass (`jax.checkpoint`). Memory for the
  logits goes from [B, T, V] (several copies: logits, soft-cap, gradient) to [B, C, V]; a
  256K vocabulary at 4,096 tokens is 4 GiB of float32 per sequence and copy.

  Args:
    head: the hidden states, the head and the chunk size.
    targets, weights, z_loss: as in `cross_entropy_loss`.
  """
  b, t = targets.shape
  c = max(1, min(int(head.chunk_size), t))
  pad = -t % c

  def chunks(x, fill=0):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape((b, (t + pad) // c, c) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def sums(x, y, w):
    return _weighted_sums(head.project(x), y, w)

  def step(total, xs):
    return total + sums(*xs), None

  xs = (chunks(head.hidden), chunks(targets), chunks(weights.astype(jnp.float32)))
  total, _ = jax.lax.scan(step, jnp.zeros(3, jnp.float32), xs)
  return _loss_output(total, weights, z_loss)


def loss_of(output: Array | ChunkedHead, targets: Array, weights: Array,
            z_loss: float = 0.0) -> LossOutput:
  """`cross_entropy_loss` of logits, or `chunked_cross_entropy_loss` of a `ChunkedHead`."""
  if isinstance(output, ChunkedHead):
    return chunked_cross_entropy_loss(output, targets, weights, z_loss)
  return cross_entropy_loss(output, targets, weights, z_loss)
