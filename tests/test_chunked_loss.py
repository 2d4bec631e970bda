"""The chunked loss: the loss, metrics and gradients of the full logits, without them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import calm as calm_lib
from calm_jax.calm import Calm
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.losses import ChunkedHead, chunked_cross_entropy_loss, cross_entropy_loss, loss_of
from calm_jax.random_init import random_like
from calm_jax.train_step import apply_fn_for
from calm_jax.transformer import Transformer

VOCAB = 37


def _lm(softcap=None):
  return TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=48, dtype='float32',
                           param_dtype='float32', final_logit_softcap=softcap)


def _batch(b=3, t=11, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, VOCAB, (b, t))
  inputs = np.concatenate([np.zeros((b, 1), int), targets[:, :-1]], axis=1)
  weights = (rng.random((b, t)) < 0.7).astype(np.float32)
  weights[0] = 0.0  # A row with no target at all.
  return {'decoder_input_tokens': jnp.asarray(inputs, jnp.int32),
          'decoder_target_tokens': jnp.asarray(targets, jnp.int32),
          'decoder_loss_weights': jnp.asarray(weights)}


def _compare(model, params, batch, chunk, z_loss):
  def losses(p, chunk_size):
    out = apply_fn_for(model, chunk_size)(p, batch)
    assert isinstance(out, ChunkedHead) == (chunk_size is not None)
    return loss_of(out, batch['decoder_target_tokens'], batch['decoder_loss_weights'], z_loss)

  full = losses(params, None)
  chunked = losses(params, chunk)
  for name in full._fields:
    np.testing.assert_allclose(getattr(chunked, name), getattr(full, name), rtol=1e-5,
                               atol=1e-7, err_msg=name)
  grad = lambda c: jax.grad(lambda p: losses(p, c).loss)(params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7),
               grad(chunk), grad(None))
  return full


@pytest.mark.parametrize('chunk', [1, 4, 11, 64])
@pytest.mark.parametrize('softcap', [None, 5.0])
def test_chunked_loss_of_a_transformer_equals_the_full_one(chunk, softcap):
  # Chunks of 4 leave a last partial chunk (11 = 4 + 4 + 3); 64 is more than the sequence.
  model = Transformer(_lm(softcap))
  params = jax.tree.map(jnp.asarray, random_like(
      nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4),
                                                                                jnp.int32))))
      ['params'], seed=1))
  full = _compare(model, params, _batch(), chunk, z_loss=1e-3)
  assert float(full.z_loss) > 0.0  # The z-term is really compared.


@pytest.mark.parametrize('chunk', [3, 8])
def test_chunked_loss_of_a_composition_equals_the_full_one(chunk):
  # Gradients of the bridges, the frozen trees included as parameters here so that the head
  # (the tied embedding) is differentiated too.
  config = CalmConfig(anchor=_lm(softcap=7.0), augments={'aug': _lm()},
                      bridges={'aug': BridgeConfig(every=1, zero_init_out=False)})
  params = jax.tree.map(jnp.asarray, random_like(nn.unbox(calm_lib.abstract_params(config)),
                                                 seed=2))
  _compare(Calm(config), params, _batch(t=9, seed=3), chunk, z_loss=0.0)


def test_a_negative_control_shifted_targets_change_the_chunked_loss():
  # The chunks must line up with their own targets: shifting the targets by one changes it.
  hidden = jax.random.normal(jax.random.key(0), (2, 10, 8))
  table = jax.random.normal(jax.random.key(1), (VOCAB, 8))
  project = lambda x: x @ table.T
  batch = _batch(b=2, t=10)
  targets, weights = batch['decoder_target_tokens'], jnp.ones((2, 10))
  full = cross_entropy_loss(project(hidden), targets, weights)
  chunked = chunked_cross_entropy_loss(ChunkedHead(hidden, project, 3), targets, weights)
  shifted = chunked_cross_entropy_loss(ChunkedHead(hidden, project, 3),
                                       jnp.roll(targets, 1, axis=1), weights)
  np.testing.assert_allclose(chunked.loss, full.loss, rtol=1e-6)
  assert abs(float(shifted.loss) - float(full.loss)) > 1e-3


def test_chunked_loss_holds_one_chunk_of_logits():
  # The compiled gradient's temporaries: [B, T, V] float32 logits are 4 MB here; with chunks
  # of 16 positions the program's temporaries stay far below one copy of them.
  b, t, d, v = 2, 512, 16, 1024
  hidden = jnp.ones((b, t, d))
  table = jax.random.normal(jax.random.key(1), (v, d))
  targets, weights = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))

  def temp_bytes(chunk):
    def loss(x):
      logits_or_head = (ChunkedHead(x, lambda y: y @ table.T, chunk) if chunk
                        else x @ table.T)
      return loss_of(logits_or_head, targets, weights).loss
    compiled = jax.jit(jax.grad(loss)).lower(hidden).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * v * 4
  assert temp_bytes(None) >= logits_bytes
  assert temp_bytes(16) < logits_bytes / 4
