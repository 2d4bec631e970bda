"""The train step: frozen by construction, exact gradients, learning through the bridges alone."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import calm as calm_lib
from calm_jax import flops, optim, trainable
from calm_jax.calm import Calm
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.losses import cross_entropy_loss
from calm_jax.random_init import random_like
from calm_jax.train_step import apply_fn_for, init_train_state, make_train_step

VOCAB = 41


def tiny_config(dtype='float32', zero_init=True):
  anchor = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=48, dtype=dtype,
                             param_dtype=dtype)
  augment = TransformerConfig(vocab_size=VOCAB, embed_dim=24, num_layers=4, num_heads=2,
                              num_kv_heads=1, head_dim=12, mlp_dim=32, dtype=dtype,
                              param_dtype=dtype)
  return CalmConfig(anchor=anchor, augments={'kv': augment},
                    bridges={'kv': BridgeConfig(every=2, num_kv_heads=2,
                                                zero_init_out=zero_init)})


def make_params(config, seed=0):
  abstract = nn.unbox(calm_lib.abstract_params(config))
  frozen = random_like({'anchor': abstract['anchor'], 'augments': abstract['augments']}, seed)
  frozen = jax.tree.map(jnp.asarray, frozen)
  return calm_lib.init_bridge_params(config, jax.random.key(seed)), frozen


def make_batch(batch=4, length=12, prompt=4, seed=0):
  """T5X prefix-LM features: loss on the targets after a `prompt`-token prefix."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, VOCAB, (batch, length))
  inputs = np.concatenate([np.zeros((batch, 1), int), targets[:, :-1]], axis=1)
  weights = (np.arange(length) >= prompt).astype(np.float32)[None].repeat(batch, 0)
  return {'decoder_input_tokens': jnp.asarray(inputs, jnp.int32),
          'decoder_target_tokens': jnp.asarray(targets, jnp.int32),
          'decoder_loss_weights': jnp.asarray(weights),
          'decoder_causal_attention': jnp.asarray(1.0 - weights, jnp.int32)}


def run_steps(config, trained, frozen, batch, steps, **optimizer_kwargs):
  optimizer, _ = optim.make_optimizer(**{'learning_rate': 1e-2, 'decay': 'constant',
                                         **optimizer_kwargs})
  step = make_train_step(apply_fn_for(Calm(config)), optimizer)
  state = init_train_state(trained, optimizer)
  history = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    history.append(float(metrics['loss']))
  return state, history


def test_frozen_by_construction():
  config = tiny_config()
  trained, frozen = make_params(config)
  before = jax.tree.map(np.array, frozen)
  trained_before = jax.tree.map(np.array, trained)
  state, history = run_steps(config, trained, frozen, make_batch(), steps=5)
  # Frozen weights: bit-identical, and still alive (never donated).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, before)
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  # The state holds the bridges only, and every bridge tensor has moved.
  assert set(state.params) == {'bridge'}
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params,
                       trained_before)
  assert all(jax.tree.leaves(moved))
  # The optimizer state mirrors the trained tree: Adam's two moments plus scalar counters.
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert not any('anchor' in p or 'augments' in p for p in paths)
  trained_size = sum(x.size for x in jax.tree.leaves(state.params))
  moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moment_size == 2 * trained_size
  assert history[-1] < history[0]


def test_selecting_the_anchor_trains_the_anchor_only():
  """The same step serves fine-tuning baselines: the trainable set is chosen by path."""
  config = tiny_config()
  bridges, frozen = make_params(config)
  everything = trainable.merge_params(bridges, frozen)
  trained, rest = trainable.split_params(everything, trainable.FULL_ANCHOR)
  assert set(trained) == {'anchor'} and set(rest) == {'augments', 'bridge'}
  rest_before = jax.tree.map(np.array, rest)
  state, _ = run_steps(config, trained, rest, make_batch(), steps=2)
  assert set(state.params) == {'anchor'}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), rest, rest_before)
  with pytest.raises(ValueError, match='No parameter matches'):
    trainable.split_params(everything, (r'^brigde/',))


def test_bridge_gradients_match_finite_differences():
  with jax.enable_x64(True):
    config = tiny_config(dtype='float64', zero_init=False)
    trained, frozen = make_params(config, seed=1)
    batch = make_batch(batch=2, length=8, seed=1)
    apply_fn = apply_fn_for(Calm(config))

    def loss(params):
      logits = apply_fn(trainable.merge_params(params, frozen), batch)
      return cross_entropy_loss(logits, batch['decoder_target_tokens'],
                                batch['decoder_loss_weights']).loss

    loss = jax.jit(loss)
    grads = jax.grad(loss)(trained)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(grads))
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), trained)
      eps = 1e-6
      plus = loss(jax.tree.map(lambda p, d: p + eps * d, trained, direction))
      minus = loss(jax.tree.map(lambda p, d: p - eps * d, trained, direction))
      numeric = float(plus - minus) / (2 * eps)
      analytic = float(sum(jnp.vdot(g, d) for g, d in
                           zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
      assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_overfits_a_fixed_batch_through_the_bridges(name):
  config = tiny_config()
  trained, frozen = make_params(config)
  batch = make_batch(batch=4, length=12)
  _, history = run_steps(config, trained, frozen, batch, steps=60, name=name,
                         learning_rate=1e-2 if name == 'adamw' else 3e-2)
  assert history[-1] < 0.5 * history[0], history[::10]


def test_schedules():
  schedule = optim.make_schedule(1.0, warmup_steps=10, decay='cosine', total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)],
                             [0.0, 0.5, 1.0, 0.0], atol=1e-6)
  linear = optim.make_schedule(2.0, warmup_steps=0, decay='linear', total_steps=100,
                               end_fraction=0.5)
  np.testing.assert_allclose([linear(0), linear(100)], [2.0, 1.0], atol=1e-6)
  rsqrt = optim.make_schedule(1.0, warmup_steps=100, decay='rsqrt')
  np.testing.assert_allclose(rsqrt(400), (100 / 400) ** 0.5, atol=1e-6)
  with pytest.raises(ValueError, match='Unknown decay'):
    optim.make_schedule(1.0, decay='step')
  with pytest.raises(ValueError, match='Unknown optimizer'):
    optim.make_optimizer('sgd')


def test_clipping_bounds_the_update():
  optimizer, _ = optim.make_optimizer('adamw', learning_rate=1.0, decay='constant',
                                      clip_norm=1e-3, b1=0.0, b2=0.0)
  params = {'w': jnp.ones(3)}
  updates, _ = optimizer.update({'w': jnp.asarray([1e3, 0.0, 0.0])},
                                optimizer.init(params), params)
  # With b1 = b2 = 0, Adam's update is the gradient's sign: clipping must not change it,
  # but a zero-clipped gradient would give no update at all.
  np.testing.assert_allclose(np.asarray(updates['w']), [-1.0, 0.0, 0.0], atol=1e-3)
  assert float(optax.tree.norm(optax.clip_by_global_norm(1e-3).update(
      {'w': jnp.asarray([1e3, 0.0, 0.0])}, None)[0])) == pytest.approx(1e-3)


def test_loss_counts_targets_only():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
  out = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                           z_loss=1e-2)
  log_z = np.log(np.exp(logits).sum(-1))
  ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  expected_ce = (ce * weights).sum() / weights.sum()
  expected_z = (log_z ** 2 * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(out.cross_entropy), expected_ce, rtol=1e-5)
  np.testing.assert_allclose(float(out.loss), expected_ce + 1e-2 * expected_z, rtol=1e-5)
  assert float(out.weight_sum) == 5.0


def _count_remat(jaxpr) -> int:
  """Rematerialised regions (`checkpoint` equations) in a jaxpr, nested jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ('checkpoint', 'remat', 'remat2')  # jax.checkpoint's name.
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_remat(sub)
  return count


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_recomputes_the_anchor_layers_above_the_first_bridge_and_changes_nothing(remat):
  config = tiny_config(zero_init=False)
  first_bridge = min(b for _, b in config.connections('kv'))
  assert 0 < first_bridge < config.anchor.num_layers
  trained, frozen = make_params(config)
  batch = make_batch()

  def loss_and_grads(model):
    apply = apply_fn_for(model)

    def loss(t):
      logits = apply(trainable.merge_params(t, frozen), batch)
      return cross_entropy_loss(logits, batch['decoder_target_tokens'],
                                batch['decoder_loss_weights']).loss
    return jax.jit(jax.value_and_grad(loss))(trained), jax.make_jaxpr(loss)(trained)

  (ref_loss, ref_grads), ref_jaxpr = loss_and_grads(Calm(config))
  (loss, grads), jaxpr = loss_and_grads(Calm(config, remat=remat))
  assert _count_remat(ref_jaxpr.jaxpr) == 0
  # One region per anchor layer from the first bridge on; none below it, none in the augment.
  assert _count_remat(jaxpr.jaxpr) == config.anchor.num_layers - first_bridge
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               ref_grads)


def test_full_remat_costs_one_forward_of_the_rematerialised_layers():
  """XLA's FLOPs grow by about one forward of the anchor layers above the first bridge."""
  anchor = TransformerConfig(vocab_size=256, embed_dim=128, num_layers=8, num_heads=4,
                             num_kv_heads=4, head_dim=32, mlp_dim=512)
  augment = TransformerConfig(vocab_size=256, embed_dim=64, num_layers=4, num_heads=2,
                              num_kv_heads=2, head_dim=32, mlp_dim=256)
  config = CalmConfig(anchor=anchor, augments={'a': augment},
                      bridges={'a': BridgeConfig(connections=((1, 2), (2, 4), (3, 6), (4, 8)))})
  abstract = nn.unbox(calm_lib.abstract_params(config))
  trained = {'bridge': abstract['bridge']}
  frozen = {'anchor': abstract['anchor'], 'augments': abstract['augments']}
  batch, length = 4, 256
  features = {name: jax.ShapeDtypeStruct((batch, length), dtype) for name, dtype in (
      ('decoder_input_tokens', jnp.int32), ('decoder_target_tokens', jnp.int32),
      ('decoder_loss_weights', jnp.float32))}

  def xla_flops(remat):
    apply = apply_fn_for(Calm(config, remat=remat))

    def loss(t, f, b):
      return cross_entropy_loss(apply(trainable.merge_params(t, f), b),
                                b['decoder_target_tokens'], b['decoder_loss_weights']).loss
    compiled = jax.jit(jax.grad(loss)).lower(trained, frozen, features).compile()
    return compiled.cost_analysis()['flops']

  extra = xla_flops('full') - xla_flops('none')
  layers = anchor.num_layers - 2  # Above the first bridge (anchor layer 2).
  one_forward = flops.lm_forward_flops(anchor, batch, length, num_layers=layers, logits=False)
  # The backward needs each layer's internals but not its last matmul's output (the MLP's down
  # projection only feeds the residual sum), which XLA does not recompute.
  down_projection = layers * 2.0 * batch * length * anchor.mlp_dim * anchor.embed_dim
  assert 0.9 < extra / (one_forward - down_projection) < 1.1, (extra, one_forward)


def test_unknown_remat_is_an_error():
  config = tiny_config()
  trained, frozen = make_params(config)
  with pytest.raises(ValueError, match="Unknown remat 'some'"):
    apply_fn_for(Calm(config, remat='some'))(trainable.merge_params(trained, frozen),
                                             make_batch())
