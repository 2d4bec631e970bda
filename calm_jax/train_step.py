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

from calm_jax import calm as calm_lib
from calm_jax import partitioning
from calm_jax.calm import AugmentStream, Calm
from calm_jax.configs import CalmConfig
from calm_jax.losses import ChunkedHead, loss_of
from calm_jax.trainable import count_params, merge_params
from calm_jax.transformer import Transformer

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


def apply_fn_for(model: nn.Module, loss_chunk_size: int | None = None) -> ApplyFn:
  """`apply(params, batch) -> logits` of a `Calm` or a `Transformer` on T5X features.

  With `loss_chunk_size`, `apply` returns a `losses.ChunkedHead` instead: the residual stream
  before the head and the head itself, which `losses.loss_of` applies `loss_chunk_size`
  positions at a time (the [B, T, V] logits never exist at once).
  """
  def apply(params, batch):
    tokens = batch['decoder_input_tokens']
    kwargs = dict(positions=batch.get('decoder_positions'),
                  segment_ids=batch.get('decoder_segment_ids'))
    if isinstance(model, Calm):
      kwargs['prompt_mask'] = batch.get('decoder_causal_attention')
      own = model.config.own_tokenizer
      if own:  # One own-tokenizer augment reads the batch's augment stream.
        if len(own) > 1:
          raise ValueError(f'a batch carries one augment stream; augments {list(own)} have '
                           'their own tokenizer.')
        kwargs['streams'] = {own[0]: AugmentStream(
            batch['augment_input_tokens'], batch['augment_read_keys'],
            batch['decoder_read_keys'], positions=batch.get('augment_positions'),
            segment_ids=batch['augment_segment_ids'],
            prompt_mask=batch['augment_causal_attention'])}
    if loss_chunk_size is None:
      return model.apply({'params': params}, tokens, **kwargs).logits
    if isinstance(model, Calm):
      depth, head = model.config.anchor.num_layers, Calm.head_logits
    else:
      depth, head = model.config.num_layers, Transformer.logits
    hidden = model.apply({'params': params}, tokens, return_hidden=(depth,),
                         compute_logits=False, **kwargs).hidden[depth]
    return ChunkedHead(hidden, lambda x: model.apply({'params': params}, x, method=head),
                       loss_chunk_size)
  return apply


def tree_all_finite(tree: Any) -> Array:
  """Whether every floating-point leaf of `tree` is finite (a scalar bool, on device)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.array(True)


def tree_max_abs(tree: Any) -> Array:
  """The largest absolute value of `tree`'s floating-point leaves (float32 scalar)."""
  values = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  return jnp.max(jnp.stack(values)) if values else jnp.zeros((), jnp.float32)


def train_step(state: TrainState, frozen: Any, batch: Batch, *, apply_fn: ApplyFn,
               optimizer: optax.GradientTransformation,
               z_loss: float = 0.0) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on `batch`, differentiating the trained tree only.

  Args:
    state: trained parameters and optimizer state (donated by `make_train_step`).
    frozen: the frozen parameters (never donated, never updated).
    batch: T5X decoder-only features [B, T].
    apply_fn: `apply(params, batch) -> logits` (or a `losses.ChunkedHead`) on the merged
      tree (`apply_fn_for`).
    optimizer: the optax transformation that built `state.opt_state`.
    z_loss: z-loss coefficient.

  Returns:
    (new state, metrics): loss, cross_entropy, z_loss, accuracy, target_tokens, grad_norm,
    param_max_abs (of the new trained tree) and finite (1 where the loss, the gradient, the new
    parameters and the new optimizer state are all finite, else 0; `calm_jax.train` stops on
    0 without a host round trip per step).
  """
  def loss_fn(trained):
    logits = apply_fn(merge_params(trained, frozen), batch)
    out = loss_of(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
                  z_loss)
    return out.loss, out

  grads, out = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  metrics = {'loss': out.loss, 'cross_entropy': out.cross_entropy, 'z_loss': out.z_loss,
             'accuracy': out.accuracy, 'target_tokens': out.weight_sum,
             'grad_norm': grad_norm, 'param_max_abs': tree_max_abs(params),
             'finite': (jnp.isfinite(out.loss) & jnp.isfinite(grad_norm)
                        & tree_all_finite((params, opt_state))).astype(jnp.int32)}
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
  def step(state, frozen, batch):
    with partitioning.activation_context(mesh, rules):
      return train_step(state, frozen, batch, apply_fn=apply_fn, optimizer=optimizer,
                        z_loss=z_loss)
  return jax.jit(step, donate_argnums=(0,), **jit_kwargs)


def state_shardings(optimizer: optax.GradientTransformation, trained: Any,
                    trained_shardings: Any, mesh: jax.sharding.Mesh) -> TrainState:
  """The shardings of a `TrainState`: the step replicated, the parameters in theirs, the
  optimizer state by `partitioning.opt_state_shardings`.

  Args:
    optimizer: the optax transformation.
    trained: the trained tree (arrays or shape structs, boxed or not).
    trained_shardings: its shardings.
    mesh: the run's mesh.
  """
  return TrainState(step=partitioning.replicated(mesh), params=trained_shardings,
                    opt_state=partitioning.opt_state_shardings(optimizer, trained,
                                                               trained_shardings, mesh))


def make_sharded_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                            z_loss: float, *, mesh: jax.sharding.Mesh, rules: partitioning.Rules,
                            train_state_shardings: TrainState, frozen_shardings: Any,
                            constrain_activations: bool = True,
                            loss_chunk_size: int | None = None):
  """`make_train_step` of `model` on `mesh`: what `calm_jax.train` runs and AOT compiles.

  The state keeps `train_state_shardings` (and is donated), the frozen tree
  `frozen_shardings`, the batch is sharded by `partitioning.batch_sharding`, the metrics come
  back replicated. `constrain_activations=False` leaves the activations' shardings to XLA (for
  comparison only). `loss_chunk_size`: the loss's logits `apply_fn_for` chunks, or None.
  """
  return make_train_step(
      apply_fn_for(model, loss_chunk_size), optimizer, z_loss,
      mesh=mesh if constrain_activations else None,
      rules=rules if constrain_activations else None,
      in_shardings=(train_state_shardings, frozen_shardings,
                    partitioning.batch_sharding(mesh, rules)),
      out_shardings=(train_state_shardings, partitioning.replicated(mesh)))


def lower_composition_step(config: CalmConfig, mesh: jax.sharding.Mesh,
                           rules: partitioning.Rules, optimizer: optax.GradientTransformation,
                           batch: int, length: int, *, remat: str = 'none',
                           constrain_activations: bool = True,
                           attention_block_size: int | None = None,
                           loss_chunk_size: int | None = None
                           ) -> tuple[Any, dict[str, int]]:
  """Lowers the composition train step on `mesh` from shapes alone (nothing is allocated).

  The arguments carry the shardings `calm_jax.train` gives the same run
  (`make_sharded_train_step`; parameters by `partitioning.param_shardings`); the state is
  donated. Compiling the result gives per-device memory and XLA's cost analysis, for any mesh,
  TPU topologies included (`launch/aot_compile.py`).

  Args:
    config: the composition.
    mesh: a mesh with axes `partitioning.MESH_AXES`.
    rules: logical axis rules.
    optimizer: the optax transformation.
    batch: global batch size (sequences).
    length: tokens per sequence.
    remat: the anchor's rematerialisation (`Calm.remat`).
    constrain_activations: trace in `partitioning.activation_context` as training does;
      False leaves the activations' shardings to XLA, for comparison only.
    attention_block_size: blocked attention (`Calm.attention_block_size`), or None.
    loss_chunk_size: the loss's logits in chunks of this many positions
      (`losses.chunked_cross_entropy_loss`), or None.

  Returns:
    (the `jax.stages.Lowered` step, {'frozen': parameters, 'trained': parameters}).
  """
  abstract = nn.unbox(calm_lib.abstract_params(config))
  shardings = partitioning.param_shardings(calm_lib.abstract_params(config), mesh, rules)
  frozen_shardings = {k: shardings[k] for k in ('anchor', 'augments')}
  frozen = partitioning.with_shardings({k: abstract[k] for k in frozen_shardings}, frozen_shardings)
  trained_shardings = {'bridge': shardings['bridge']}
  trained = partitioning.with_shardings({'bridge': abstract['bridge']}, trained_shardings)
  train_state_shardings = state_shardings(optimizer, trained, trained_shardings, mesh)
  state = partitioning.with_shardings(
      TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                 opt_state=jax.eval_shape(optimizer.init, trained)), train_state_shardings)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  features = {'decoder_input_tokens': jnp.int32, 'decoder_target_tokens': jnp.int32,
              'decoder_loss_weights': jnp.float32}
  batch_structs = {name: jax.ShapeDtypeStruct((batch, length), dtype, sharding=batch_sharding)
                   for name, dtype in features.items()}
  step_fn = make_sharded_train_step(
      Calm(config, remat=remat, attention_block_size=attention_block_size), optimizer, 0.0,
      mesh=mesh, rules=rules,
      train_state_shardings=train_state_shardings, frozen_shardings=frozen_shardings,
      constrain_activations=constrain_activations, loss_chunk_size=loss_chunk_size)
  return (step_fn.lower(state, frozen, batch_structs),
          {'frozen': count_params(frozen), 'trained': count_params(trained)})
