"""Decoding caches: window rings and blocked reads of the written slots change no logit.

Every cached step is compared with the full forward pass over the same prefix, for ring caches
that wrap several times (windows shorter than the prompts), ragged prompts, a composition with
two augments, and blocks of cache slots that do and do not divide the cache (the last block
overhanging it). Slots not yet written are filled with NaN: a step that read one would return
NaN, and the materialised path (which reads every slot) does, as a negative control.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import decoding, masks
from calm_jax.attention import ring_cache
from calm_jax.calm import Calm
from calm_jax.configs import TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params

from test_calm import VOCAB, init, make_config
from test_decoding import GEMMA_LIKE

PROMPT = 8
NEW = 10
LAST = np.array([0, 4, 7])  # Each row's last prompt index: prompts of 1, 5 and 8 tokens.
# Mistral-like: every layer a window (2 < every prompt but the first).
MISTRAL_LIKE = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4,
                                 num_kv_heads=1, head_dim=8, mlp_dim=48,
                                 attention_types=('local', 'local'), sliding_window=2)


@functools.lru_cache(maxsize=None)
def lm_params(name):
  config = {'gemma': GEMMA_LIKE, 'mistral': MISTRAL_LIKE}[name]
  return config, random_like(nn.unbox(abstract_params(config)), 5, plus_one=True)


@functools.lru_cache(maxsize=None)
def calm_params():
  config = make_config(zero_init=False)
  return config, init(config)


def model_and_params(kind, block):
  if kind == 'composition':
    config, params = calm_params()
    return Calm(config, decode_block_size=block), params
  config, params = lm_params(kind)
  return Transformer(config, decode_block_size=block), params


def sequences(seed=2):
  tokens = np.random.default_rng(seed).integers(2, VOCAB, (3, PROMPT + NEW))
  prompt_mask = (np.arange(PROMPT + NEW)[None] <= LAST[:, None]).astype(np.int32)
  return tokens, prompt_mask


def full_logits(model, params, tokens, prompt_mask):
  kwargs = {'prompt_mask': jnp.asarray(prompt_mask)} if isinstance(model, Calm) else {}
  return np.asarray(jax.jit(lambda p, t: model.apply({'params': p}, t, **kwargs).logits)(
      params, jnp.asarray(tokens)))


def _poison(cache, written):
  """NaN in every slot past index `written` of every row (window rings, of fewer slots, are
  left as they are)."""
  def poison(x):
    if x.ndim != 4:
      return x
    slots = jnp.arange(x.shape[1])[None, :, None, None]
    return jnp.where(slots > written, jnp.nan, x)
  return jax.tree.map(poison, cache)


def cached_logits(model, params, tokens, prompt_mask, poison=False):
  prefill = jax.jit(lambda p, t, m: decoding.prefill(model, p, t, m, NEW))
  step = jax.jit(lambda p, t, pos, c: decoding.extend(model, p, t, pos, c))
  rows = np.arange(3)
  last, logits, cache = prefill(params, jnp.asarray(tokens[:, :PROMPT]),
                                jnp.asarray(prompt_mask[:, :PROMPT]))
  np.testing.assert_array_equal(last, LAST)
  out = [np.asarray(logits)]
  for i in range(1, NEW):
    position = LAST + i
    args = (jnp.asarray(tokens[rows, position])[:, None], jnp.asarray(position)[:, None])
    logits, new_cache = step(params, *args, cache)
    if poison:  # The step again, with NaN past the longest row's new index: slots no row
      # may read at this step.
      logits, _ = step(params, *args, _poison(cache, position.max()))
    cache = new_cache
    out.append(np.asarray(logits))
  return out, cache


@pytest.mark.parametrize('block', [None, 1, 4, 256])
@pytest.mark.parametrize('kind', ['gemma', 'mistral', 'composition'])
def test_every_step_with_rings_and_blocks_equals_the_full_forward_pass(kind, block):
  model, params = model_and_params(kind, block)
  tokens, prompt_mask = sequences()
  reference = full_logits(model, params, tokens, prompt_mask)
  steps, _ = cached_logits(model, params, tokens, prompt_mask)
  for i, logits in enumerate(steps):
    np.testing.assert_allclose(logits, reference[np.arange(3), LAST + i], rtol=0, atol=1e-5,
                               err_msg=f'step {i}')


@pytest.mark.parametrize('kind', ['gemma', 'composition'])
def test_blocked_steps_never_read_unwritten_slots(kind):
  # Before each step, NaN in every slot past the longest row's new index: the blocked steps
  # read no further (their last block may overhang: blocks of 2), so no NaN is read. The
  # materialised path multiplies every slot's value by its probability, and a 0 * NaN makes
  # the logits NaN.
  tokens, prompt_mask = sequences()
  model, params = model_and_params(kind, 2)
  reference = full_logits(model, params, tokens, prompt_mask)
  steps, _ = cached_logits(model, params, tokens, prompt_mask, poison=True)
  for i, logits in enumerate(steps):
    np.testing.assert_allclose(logits, reference[np.arange(3), LAST + i], rtol=0, atol=1e-5)
  model, params = model_and_params(kind, None)
  steps, _ = cached_logits(model, params, tokens, prompt_mask, poison=True)
  assert np.isnan(steps[1]).any()


def test_window_layers_keep_ring_caches_of_their_window():
  model, params = model_and_params('gemma', None)
  tokens, prompt_mask = sequences()
  _, cache = cached_logits(model, params, tokens, prompt_mask)
  window, length = GEMMA_LIKE.sliding_window, PROMPT + NEW
  for i, kind in enumerate(GEMMA_LIKE.attention_types):
    slots = cache[f'layer_{i}']['keys'].shape[1]
    assert slots == (window if kind == 'local' else length), (i, kind, slots)
  # The composition: the anchor's local layers ring, its global ones and the bridges' caches
  # (global: the augment's every position) keep every slot.
  config, _ = calm_params()
  model, params = model_and_params('composition', None)
  _, cache = cached_logits(model, params, tokens, prompt_mask)
  for i, kind in enumerate(config.anchor.attention_types):
    slots = cache['anchor'][f'layer_{i}']['keys'].shape[1]
    assert slots == (config.anchor.sliding_window if kind == 'local' else length)
  assert cache['bridge']['kv']['block_0']['keys'].shape[1] == length


def test_ring_cache_of_a_prefill_keeps_each_rows_last_window():
  # keys[b, t] = t + 1 (0 is 'empty'); rows end at 0, 4 and 7; a ring of 3 slots.
  keys = jnp.broadcast_to(jnp.arange(1, 9, dtype=jnp.float32)[None, :, None, None], (3, 8, 1, 1))
  ring = np.asarray(ring_cache(keys, keys, jnp.asarray(LAST), 3)['keys'][..., 0, 0])
  # Slot s holds the latest index q <= last with q mod 3 = s.
  np.testing.assert_array_equal(ring, [[1, 0, 0], [4, 5, 3], [7, 8, 6]])


def test_cache_mask_of_a_full_cache_is_the_causal_window_mask():
  # Slot s of a cache with a slot per index holds index s: the ring formula reduces to
  # s <= p (and p - s < window).
  positions = jnp.asarray([[0], [3], [9]])
  slots = jnp.arange(10)[None, None, :]
  for window in (None, 2, 4):
    mask = masks.cache_mask(positions, 10, window).materialize()
    expected = slots <= positions[:, :, None]
    if window is not None:
      expected &= positions[:, :, None] - slots < window
    np.testing.assert_array_equal(mask, expected)
  ring = masks.cache_mask(positions, 4, window=4)
  np.testing.assert_array_equal(ring.write_index(), positions % 4)
  np.testing.assert_array_equal(ring.slot_indices(jnp.arange(4))[2, 0], [8, 9, 6, 7])
  np.testing.assert_array_equal(masks.cache_mask(positions, 10, 4).write_index(), positions)


def test_caches_without_window_rings_keep_every_slot():
  # What own-tokenizer compositions prefill: their anchor re-runs earlier tokens (several per
  # step), which a ring cannot hold (tests/test_alignment.py decodes them).
  lm = Transformer(GEMMA_LIKE)
  params = lm_params('gemma')[1]
  tokens, prompt_mask = sequences()
  out = lm.apply({'params': params}, jnp.asarray(tokens[:, :PROMPT]),
                 jnp.asarray(prompt_mask[:, :PROMPT]), cache_length=PROMPT + NEW,
                 window_caches=False, method=Transformer.prefill)
  assert {c['keys'].shape[1] for c in out.cache.values()} == {PROMPT + NEW}
