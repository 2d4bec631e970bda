"""The train step: frozen by construction, exact gradients, learning through the bridges alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import calm as calm_lib
from calm_jax import optim, trainable
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
  for i in range(steps):
    state, metrics = step(state, frozen, batch, jax.random.key(i))
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
