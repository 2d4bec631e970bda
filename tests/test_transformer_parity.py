"""Parity with transformers' PyTorch models: tiny random checkpoints of every family, converted."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoints
from calm_jax.convert import huggingface, tiny_hf
from calm_jax.transformer import Transformer

BATCH, LENGTH = 2, 11  # LENGTH > 2 * tiny_hf.WINDOW: the sliding window matters.
TOLERANCE = 1e-4


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  # Stay clear of the ids the multimodal Gemma 3 reserves for images.
  tokens = rng.integers(1, tiny_hf.VOCAB - 3, (BATCH, LENGTH))
  mask = np.ones((BATCH, LENGTH), np.int64)
  mask[1, 7:] = 0  # Right padding.
  return tokens, mask


@pytest.fixture(scope='module', params=tiny_hf.FAMILIES)
def converted(request, tmp_path_factory, inputs):
  """(family, HF model, our config, our params, HF logits, HF hidden states)."""
  family = request.param
  model = tiny_hf.make_model(family)
  tokens, mask = inputs
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                output_hidden_states=True)
  hidden = [h.numpy() for h in out.hidden_states]
  root = tmp_path_factory.mktemp(family)
  tiny_hf.save_model(model, str(root / 'hf'))
  huggingface.convert_hf_checkpoint(str(root / 'hf'), str(root / 'lm'), log=lambda _: None)
  config, params = checkpoints.load_lm(str(root / 'lm'))
  return family, config, params, out.logits.numpy(), hidden


def _run(config, params, inputs, **kwargs):
  tokens, mask = inputs
  return Transformer(config).apply({'params': params}, jnp.asarray(tokens),
                                   segment_ids=jnp.asarray(mask), **kwargs)


def _max_diff(ours, reference, mask):
  return float(np.abs(np.asarray(ours) - reference)[mask.astype(bool)].max())


def test_logits_match_transformers(converted, inputs):
  _, config, params, reference, _ = converted
  assert config.param_dtype == 'float32'
  assert _max_diff(_run(config, params, inputs).logits, reference, inputs[1]) <= TOLERANCE


def test_residual_stream_matches_transformers(converted, inputs):
  """hidden[i] is the residual stream after i layers (HF's hidden_states[i], i < n)."""
  _, config, params, _, reference = converted
  layers = tuple(range(config.num_layers))
  hidden = _run(config, params, inputs, return_hidden=layers).hidden
  for i in layers:
    assert _max_diff(hidden[i], reference[i], inputs[1]) <= TOLERANCE, i


def test_hidden_without_logits_stops_early(converted, inputs):
  _, config, params, _, _ = converted
  full = _run(config, params, inputs, return_hidden=(2,))
  partial = _run(config, params, inputs, return_hidden=(2,), compute_logits=False)
  assert partial.logits is None
  np.testing.assert_array_equal(np.asarray(partial.hidden[2]), np.asarray(full.hidden[2]))


# Negative controls: each wrong convention must move the logits far outside the tolerance,
# showing that the parity test above can fail.
WRONG_CONVENTIONS = {
    'gemma2': [dict(norm_plus_one=False), dict(attention_types=(), sliding_window=None),
               dict(final_logit_softcap=None), dict(query_pre_attn_scalar=None)],
    'gemma3_text': [dict(local_rope_base=None), dict(rope_scaling=None)],
    'llama': [dict(rope_scaling=None), dict(rope_base=500_000.0)],
    'mistral': [dict(sliding_window=2 * tiny_hf.WINDOW)],
    'gemma': [dict(scale_embeddings=False)],
}


@pytest.mark.parametrize('family,change', [(f, c) for f, cs in WRONG_CONVENTIONS.items()
                                           for c in cs])
def test_wrong_convention_is_caught(family, change, tmp_path, inputs):
  model = tiny_hf.make_model(family)
  reference = tiny_hf.reference_logits(model, *inputs)
  tiny_hf.save_model(model, str(tmp_path / 'hf'))
  config = huggingface.convert_hf_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'lm'),
                                             log=lambda _: None)
  _, params = checkpoints.load_lm(str(tmp_path / 'lm'))
  right = _run(config, params, inputs).logits
  wrong = _run(dataclasses.replace(config, **change), params, inputs).logits
  assert _max_diff(right, reference, inputs[1]) <= TOLERANCE
  assert _max_diff(wrong, reference, inputs[1]) > 100 * TOLERANCE
