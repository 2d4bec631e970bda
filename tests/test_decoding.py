"""Cached decoding: every step equals a full forward pass; greedy, sampling and beam search.

The composition under test has random non-zero bridges, two augments, GQA cross-attention and a
sliding-window anchor (tests/test_calm.py's `make_config`); prompts of different lengths share a
batch. The reference is the full forward pass over the same prefix, which tests/test_calm.py
checks for causality and padding, and the uncached `greedy_decode`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import decoding
from calm_jax.calm import Calm
from calm_jax.configs import TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params

from test_calm import VOCAB, init, make_config

PROMPT = 8  # Width of the prompt array.
NEW = 6  # Tokens decoded.
FIRST = np.array([1, 4, 7])  # Index of each row's last prompt token (prompts of 2, 5, 8).
EOS = 1

# A Gemma-2-like single LM: local/global layers (window 3 < length), soft-caps, sandwich norms.
GEMMA_LIKE = TransformerConfig(
    vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=48, attention_types=('local', 'global', 'local'), sliding_window=3,
    attn_logit_softcap=50.0, final_logit_softcap=30.0, norm_plus_one=True, sandwich_norms=True,
    scale_embeddings=True, tie_embeddings=True, activation='gelu_tanh', query_pre_attn_scalar=16,
    local_rope_base=10_000.0, rope_base=100_000.0)


@functools.lru_cache(maxsize=None)
def composition(encoder: bool):
  config = make_config(zero_init=False, augment_as_encoder=encoder)
  return Calm(config), init(config)


@functools.lru_cache(maxsize=None)
def single_lm():
  config = GEMMA_LIKE
  return Transformer(config), random_like(nn.unbox(abstract_params(config)), 3, plus_one=True)


def model_and_params(kind):
  return single_lm() if kind == 'lm' else composition(kind == 'encoder')


def sequences(seed=1):
  """[3, PROMPT + NEW] tokens (no EOS, no padding id) and the prompt mask of each prefix."""
  tokens = np.random.default_rng(seed).integers(2, VOCAB, (3, PROMPT + NEW))
  prompt_mask = (np.arange(PROMPT + NEW)[None] <= FIRST[:, None]).astype(np.int32)
  return tokens, prompt_mask


@functools.lru_cache(maxsize=None)
def _jitted_forward(model):
  def forward(params, tokens, prompt_mask):
    kwargs = {'prompt_mask': prompt_mask} if isinstance(model, Calm) else {}
    return model.apply({'params': params}, tokens, **kwargs).logits
  return jax.jit(forward)


def full_logits(model, params, tokens, prompt_mask):
  return np.asarray(_jitted_forward(model)(params, jnp.asarray(tokens), jnp.asarray(prompt_mask)))


@functools.lru_cache(maxsize=None)
def _jitted_prefill_and_step(model):
  prefill = jax.jit(lambda p, t, m: decoding.prefill(model, p, t, m, NEW))
  step = jax.jit(lambda p, t, pos, c: decoding.extend(model, p, t, pos, c))
  return prefill, step


def cached_logits(model, params, tokens, prompt_mask):
  """Logits of the prefill and of each teacher-forced cached step: [NEW] arrays [3, V].

  The prompt array carries the continuation after each prompt (garbage to the prefill), which
  must not matter.
  """
  prefill, step = _jitted_prefill_and_step(model)
  rows = np.arange(3)
  first, logits, cache = prefill(params, jnp.asarray(tokens[:, :PROMPT]),
                                 jnp.asarray(prompt_mask[:, :PROMPT]))
  np.testing.assert_array_equal(first, FIRST)
  out = [np.asarray(logits)]
  for i in range(1, NEW):
    position = FIRST + i
    logits, cache = step(params, jnp.asarray(tokens[rows, position])[:, None],
                         jnp.asarray(position)[:, None], cache)
    out.append(np.asarray(logits))
  return out


@pytest.mark.parametrize('kind', ['composition', 'encoder', 'lm'])
def test_every_cached_step_equals_the_full_forward_pass(kind):
  model, params = model_and_params(kind)
  tokens, prompt_mask = sequences()
  reference = full_logits(model, params, tokens, prompt_mask)
  for i, logits in enumerate(cached_logits(model, params, tokens, prompt_mask)):
    np.testing.assert_allclose(logits, reference[np.arange(3), FIRST + i], rtol=0, atol=1e-5,
                               err_msg=f'step {i}')


def test_composed_cache_layout():
  model, params = composition(False)
  tokens, prompt_mask = sequences()
  prefill, _ = _jitted_prefill_and_step(model)
  _, _, cache = prefill(params, jnp.asarray(tokens[:, :PROMPT]),
                        jnp.asarray(prompt_mask[:, :PROMPT]))
  assert set(cache) == {'anchor', 'augments', 'bridge', 'prompt_length'}
  assert set(cache['anchor']) == {f'layer_{i}' for i in range(4)}
  # Augment 'kv' (8 layers) is read at layers 4 and 8; 'aux' (2 layers) at 1 and 2.
  assert set(cache['augments']['kv']) == {f'layer_{i}' for i in range(8)}
  assert set(cache['augments']['aux']) == {'layer_0', 'layer_1'}
  assert set(cache['bridge']['kv']) == {'block_0', 'block_1'}
  # GQA cross-attention: 2 kv heads of 8 dims, one slot per prompt + decoded position.
  assert cache['bridge']['kv']['block_0']['keys'].shape == (3, PROMPT + NEW, 2, 8)
  np.testing.assert_array_equal(cache['prompt_length'], FIRST + 1)


def test_stale_augment_is_detected():
  """Without refreshing the augment (the encoder ablation's decoding) the steps differ.

  The same cached steps that equal the full forward pass of the composition (test above) miss it
  by far when the augment stops at the prompt: the equality test can see a stale augment.
  """
  live, params = composition(False)
  stale, _ = composition(True)
  tokens, prompt_mask = sequences()
  reference = full_logits(live, params, tokens, prompt_mask)
  steps = cached_logits(stale, params, tokens, prompt_mask)
  rows = np.arange(3)
  np.testing.assert_allclose(steps[0], reference[rows, FIRST], rtol=0, atol=1e-5)  # Same prompt.
  gaps = [float(np.abs(logits - reference[rows, FIRST + i]).max())
          for i, logits in enumerate(steps) if i > 0]
  assert min(gaps) > 1e-2, gaps  # Every step misses by > 1000x the tolerance.


@functools.lru_cache(maxsize=None)
def generate_fn(kind, **kwargs):
  model, _ = model_and_params(kind)
  return decoding.make_generate_fn(model, max_decode_len=NEW, eos_id=EOS, **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted_greedy_reference(model):
  def reference(params, input_tokens, prompt_mask):
    def logits_fn(tokens):
      kwargs = {'prompt_mask': prompt_mask} if isinstance(model, Calm) else {}
      return model.apply({'params': params}, tokens, **kwargs).logits
    return decoding.greedy_decode(logits_fn, input_tokens, prompt_mask, NEW, EOS)
  return jax.jit(reference)


def decode_inputs(seed=1):
  """Decoder input tokens [3, PROMPT + NEW] (room for the reference) and the prompt mask."""
  tokens, prompt_mask = sequences(seed)
  return jnp.asarray(tokens), jnp.asarray(prompt_mask)


@pytest.mark.parametrize('kind', ['composition', 'encoder', 'lm'])
def test_greedy_equals_the_argmax_loop_of_full_forward_passes(kind):
  model, params = model_and_params(kind)
  tokens, prompt_mask = decode_inputs()
  expected = np.asarray(_jitted_greedy_reference(model)(params, tokens, prompt_mask))
  got = generate_fn(kind)(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT],
                          jax.random.key(0))
  np.testing.assert_array_equal(got, expected)


def test_greedy_stops_rows_at_eos():
  model, params = composition(False)
  tokens, prompt_mask = decode_inputs()
  free = np.asarray(generate_fn('composition')(params, tokens[:, :PROMPT],
                                               prompt_mask[:, :PROMPT], jax.random.key(0)))
  # Make the second greedy token the EOS of a decoder that stops there.
  eos = int(free[0, 1])
  fn = decoding.make_generate_fn(model, max_decode_len=NEW, eos_id=eos)
  out = np.asarray(fn(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT], jax.random.key(0)))
  assert (out[0, 2:] == 0).all()
  for row in range(3):
    hits = np.flatnonzero(free[row] == eos)
    stop = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(out[row, :stop], free[row, :stop])
    np.testing.assert_array_equal(out[row, stop:], 0)


def test_beam_of_one_equals_greedy():
  _, params = composition(False)
  tokens, prompt_mask = decode_inputs()
  args = (params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT], jax.random.key(0))
  np.testing.assert_array_equal(generate_fn('composition', num_beams=1)(*args),
                                generate_fn('composition')(*args))
  model, _ = composition(False)
  beam = jax.jit(lambda p, t, m: decoding.beam_search(model, p, t, m, max_decode_len=NEW,
                                                      eos_id=EOS, num_beams=1)[0])
  np.testing.assert_array_equal(beam(*args[:3]), generate_fn('composition')(*args))


def sequence_log_prob(model, params, input_tokens, prompt_mask, generated):
  """Sum of log p(token) of `generated` [B, NEW] after each prompt, by full forward passes."""
  input_tokens, prompt_mask = np.array(input_tokens), np.asarray(prompt_mask)
  rows = np.arange(len(generated))
  for i in range(NEW - 1):
    input_tokens[rows, FIRST + 1 + i] = generated[:, i]
  logits = full_logits(model, params, input_tokens, prompt_mask)
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  total = np.zeros(len(generated))
  for i in range(NEW):
    alive = (generated[:, :i] != EOS).all(axis=1)
    total += np.where(alive, log_probs[rows, FIRST + i, generated[:, i]], 0.0)
  return total


def test_beam_search_scores_are_the_sequences_log_probabilities():
  model, params = composition(False)
  tokens, prompt_mask = decode_inputs()
  search = jax.jit(lambda p, t, m: decoding.beam_search(model, p, t, m, max_decode_len=NEW,
                                                        eos_id=EOS, num_beams=4))
  best, score = search(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT])
  best, score = np.asarray(best), np.asarray(score)
  np.testing.assert_allclose(score, sequence_log_prob(model, params, tokens, prompt_mask, best),
                             rtol=1e-5, atol=1e-5)
  greedy = np.asarray(generate_fn('composition')(params, tokens[:, :PROMPT],
                                                 prompt_mask[:, :PROMPT], jax.random.key(0)))
  greedy_score = sequence_log_prob(model, params, tokens, prompt_mask, greedy)
  # Four beams find a sequence at least as likely as greedy's on this model (not a theorem).
  assert np.all(score >= greedy_score - 1e-5)
  assert np.any(score > greedy_score + 1e-3)


def test_filters_keep_exactly_the_top_k_and_the_nucleus():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, VOCAB)) * 3, jnp.float32)
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_k=5)))
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  expected = np.zeros_like(kept)
  np.put_along_axis(expected, top5, True, axis=-1)
  np.testing.assert_array_equal(kept, expected)

  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.7)))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  for row in range(64):
    order = np.argsort(-probs[row])
    mass_before = np.cumsum(probs[row, order]) - probs[row, order]
    nucleus = set(order[mass_before < 0.7].tolist())
    assert set(np.flatnonzero(kept[row]).tolist()) == nucleus
    assert probs[row, sorted(nucleus)].sum() >= 0.7 - 1e-6


@pytest.mark.parametrize('sampling', [decoding.Sampling(temperature=1.0, top_k=3),
                                      decoding.Sampling(temperature=1.0, top_p=0.5)])
def test_sampled_tokens_respect_the_filter(sampling):
  model, params = composition(False)
  tokens, prompt_mask = decode_inputs()
  fn = generate_fn('composition', sampling=sampling)
  seen = []
  for seed in range(4):
    out = np.asarray(fn(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT],
                        jax.random.key(seed)))
    seen.append(out)
    # The logits each token was sampled from: a full forward pass over the sampled prefix.
    inputs = np.array(tokens)
    rows = np.arange(3)
    for i in range(NEW - 1):
      inputs[rows, FIRST + 1 + i] = out[:, i]
    logits = full_logits(model, params, inputs, prompt_mask)
    for i in range(NEW):
      alive = (out[:, :i] != EOS).all(axis=1)
      step = logits[rows, FIRST + i]
      allowed = np.isfinite(np.asarray(decoding.filter_logits(
          jnp.asarray(step), sampling.top_k, sampling.top_p)))
      assert all(allowed[r, out[r, i]] for r in rows if alive[r]), (seed, i)
  assert len({s.tobytes() for s in seen}) > 1  # Different seeds, different samples.
  again = fn(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT], jax.random.key(0))
  np.testing.assert_array_equal(again, seen[0])  # Fixed seed, fixed output.


def test_decoding_compiles_once_per_shape(monkeypatch):
  model, params = composition(False)
  traces = []

  def counting(method, is_step):
    def traced(self, *args, **kwargs):
      traces.append(is_step)
      return method(self, *args, **kwargs)
    return traced

  monkeypatch.setattr(Calm, 'prefill', counting(Calm.prefill, False))
  monkeypatch.setattr(Calm, 'extend', counting(Calm.extend, True))
  fn = decoding.make_generate_fn(model, max_decode_len=NEW, eos_id=EOS)
  tokens, prompt_mask = decode_inputs()
  fn(params, tokens[:, :PROMPT], prompt_mask[:, :PROMPT], jax.random.key(0))
  assert traces.count(False) == 1 and traces.count(True) == 1  # One prefill, one step body.
  other, _ = decode_inputs(seed=2)
  fn(params, other[:, :PROMPT], prompt_mask[::-1, :PROMPT], jax.random.key(1))
  assert len(traces) == 2  # Same shapes, new values: no retracing.
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_bad_arguments():
  model, _ = composition(False)
  with pytest.raises(ValueError, match='temperature'):
    decoding.Sampling(temperature=-1.0)
  with pytest.raises(ValueError, match='top_p'):
    decoding.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match='beam search does not sample'):
    decoding.make_generate_fn(model, max_decode_len=2, eos_id=1, num_beams=2,
                              sampling=decoding.Sampling(temperature=1.0))
  with pytest.raises(ValueError, match='num_beams'):
    decoding.make_generate_fn(model, max_decode_len=2, eos_id=1, num_beams=0)

