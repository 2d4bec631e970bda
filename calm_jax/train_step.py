"""One training step, for compositions and for the baselines that train anchor weights.

`TrainState` holds only the trained tree and its optimizer state. Frozen parameters are a
separate, non-donated argument, merged in inside the loss; the gradient is taken with respect
to the trained tree alone, so XLA computes no frozen-weight gradient and no backward pass below
the first trained parameter (DESIGN.md, cost rules).

Batches use T5X's decoder-only feature names: decoder_input_tokens, decoder_target_tokens,
decoder_loss_weights and optionally decoder_segment_ids, decoder_positions and
decoder_causal_attention (1 on the prompt; the prompt mask of `augment_as_encoder`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from calm_jax import partitioning
from calm_jax.calm import Calm
from calm_jax.losses import cross_entropy_loss
from calm_jax.trainable import merge_params

Array = jax.Array
Batch = Mapping[str, Array]
ApplyFn = Callable[[Any, Batch], Array]


@flax.struct.dataclass
class TrainState:
  """What a training run updates and checkpoints.

  Attributes:
    step: number of steps taken, int32 scalar.
    params: the trained parameters only.
    opt_state: the optimizer state of `params` (no frozen leaf).
  """

  step: Array
  params: Any
  opt_state: Any


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """A step-0 state for the trained tree `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def apply_fn_for(model: nn.Module) -> ApplyFn:
  """`apply(params, batch) -> logits` of a `Calm` or a `Transformer` on T5X features."""
  def apply(params, batch):
    tokens = batch['decoder_input_tokens']
    kwargs = dict(positions=batch.get('decoder_positions'),
                  segment_ids=batch.get('decoder_segment_ids'))
    if isinstance(model, Calm):
      kwargs['prompt_mask'] = batch.get('decoder_causal_attention')
    return model.apply({'params': params}, tokens, **kwargs).logits
  return apply


def train_step(state: TrainState, frozen: Any, batch: Batch, rng: Array, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation,
               z_loss: float = 0.0) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on `batch`, differentiating the trained tree only.

  Args:
    state: trained parameters and optimizer state (donated by `make_train_step`).
    frozen: the frozen parameters (never donated, never updated).
    batch: T5X decoder-only features [B, T].
    rng: base key; folded with the step (unused by deterministic models).
    apply_fn: `apply(params, batch) -> logits` on the merged tree (`apply_fn_for`).
    optimizer: the optax transformation that built `state.opt_state`.
    z_loss: z-loss coefficient.

  Returns:
    (new state, metrics): loss, cross_entropy, z_loss, accuracy, target_tokens, grad_norm.
  """
  del rng  # No dropout; kept so stochastic models can fold in state.step.

  def loss_fn(trained):
    logits = apply_fn(merge_params(trained, frozen), batch)
    out = cross_entropy_loss(logits, batch['decoder_target_tokens'],
                             batch['decoder_loss_weights'], z_loss)
    return out.loss, out

  grads, out = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': out.loss, 'cross_entropy': out.cross_entropy, 'z_loss': out.z_loss,
             'accuracy': out.accuracy, 'target_tokens': out.weight_sum,
             'grad_norm': optax.tree.norm(grads)}
  return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
                    z_loss: float = 0.0, *, mesh: jax.sharding.Mesh | None = None,
                    rules: partitioning.Rules | None = None, **jit_kwargs):
  """`train_step` jitted once, donating the state (argument 0) and never the frozen tree.

  Args:
    apply_fn: see `train_step`.
    optimizer: see `train_step`.
    z_loss: see `train_step`.
    mesh: with `rules`, the step is traced in `partitioning.activation_context(mesh, rules)`,
      so the model's activation sharding constraints apply (a sharded run must pass both).
    rules: logical axis rules (`MeshConfig.rules()`).
    **jit_kwargs: passed to `jax.jit` (in_shardings, out_shardings, ...).
  """
  def step(state, frozen, batch, rng):
    with partitioning.activation_context(mesh, rules):
      return train_step(state, frozen, batch, rng, apply_fn=apply_fn, optimizer=optimizer,
                        z_loss=z_loss)
  return jax.jit(step, donate_argnums=(0,), **jit_kwargs)
