"""LoRA (calm_jax.lora, calm-train's 'lora' mode): starts as exactly the anchor, trains the
adapters alone, folds them into a plain LM checkpoint, and matches the bridges' size."""

import functools

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import calm as calm_lib
from calm_jax import checkpoints, lora, optim, trainable
from calm_jax import train as train_lib
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params
from calm_tasks import kv_arithmetic

VOCAB = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).vocab_size
ANCHOR = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True)
LORA = lora.LoRAConfig(rank=3, alpha=6.0)


def _flat(tree):
  return traverse_util.flatten_dict(nn.unbox(dict(tree)), sep='/')


def _base():
  return jax.tree.map(jnp.asarray, random_like(abstract_params(ANCHOR), seed=1))


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (2, 7)), jnp.int32)


def _logits(model, params):
  return np.asarray(model.apply({'params': params}, _tokens()).logits)


def test_adapters_sit_beside_every_projection_and_start_as_the_anchor():
  base = _base()
  adapters = lora.init_adapters(abstract_params(ANCHOR, LORA), jax.random.key(0))
  flat = _flat(adapters)
  kernels = {k[:-len('_lora_a')] for k in flat if k.endswith('_lora_a')}
  assert kernels == {f'layer_{i}/{block}/{name}' for i in range(2)
                     for block, names in (('attn', ('query', 'key', 'value', 'out')),
                                          ('mlp', ('gating', 'up', 'down')))
                     for name in names}
  assert trainable.count_params(adapters) == lora.adapter_count(ANCHOR, LORA)
  assert all(not np.any(v) for k, v in flat.items() if k.endswith('_lora_b'))
  assert all(np.any(v) for k, v in flat.items() if k.endswith('_lora_a'))
  merged = trainable.merge_params(adapters, base)
  np.testing.assert_array_equal(_logits(Transformer(ANCHOR, lora=LORA), merged),
                                _logits(Transformer(ANCHOR), base))


def test_trained_adapters_fold_into_the_kernels():
  """x W + s (x A) B == x (W + s A B) for every projection shape (q/k/v, out, MLP)."""
  base = _base()
  adapters = jax.tree.map(jnp.asarray, random_like(
      trainable.split_params(abstract_params(ANCHOR, LORA), lora.ADAPTER_PATTERNS)[0], seed=2))
  assert all(np.any(v) for v in _flat(adapters).values())
  adapted = _logits(Transformer(ANCHOR, lora=LORA), trainable.merge_params(adapters, base))
  folded = lora.merge_adapters(trainable.merge_params(adapters, base), LORA)
  assert set(_flat(folded)) == set(_flat(base))
  reference = _logits(Transformer(ANCHOR), base)
  assert np.abs(adapted - reference).max() > 1e-2  # The adapters do change the model ...
  np.testing.assert_allclose(_logits(Transformer(ANCHOR), folded), adapted, atol=1e-5,
                             rtol=1e-5)  # ... and folding them in changes nothing more.


def test_rank_matches_the_bridges_within_half_a_rank_step():
  augment = TransformerConfig(vocab_size=VOCAB, embed_dim=24, num_layers=4, num_heads=2,
                              num_kv_heads=2, head_dim=12, mlp_dim=48)
  config = CalmConfig(anchor=ANCHOR, augments={'augment': augment},
                      bridges={'augment': BridgeConfig(connections=((1, 0), (3, 1)))})
  budget = trainable.count_params(calm_lib.abstract_params(config)['bridge'])
  rank = lora.rank_for_budget(ANCHOR, budget)
  step = lora.adapter_count(ANCHOR, lora.LoRAConfig(1))
  assert abs(lora.adapter_count(ANCHOR, lora.LoRAConfig(rank)) - budget) <= step / 2
  assert lora.rank_for_budget(ANCHOR, 1) == 1


def test_bad_lora_configs():
  with pytest.raises(ValueError, match='rank must be a positive int'):
    lora.LoRAConfig(rank=0)
  with pytest.raises(ValueError, match=r"unknown \['embedder'\]"):
    lora.LoRAConfig(rank=2, targets=('query', 'embedder'))


def test_lora_run_trains_adapters_only_and_exports_the_folded_anchor(tmp_path):
  anchor_dir = tmp_path / 'anchor'
  base = _base()
  checkpoints.save_lm(anchor_dir, ANCHOR, base)
  before = jax.tree.map(np.array, checkpoints.load_lm(anchor_dir)[1])
  run = tmp_path / 'lora'
  metrics = train_lib.train(
      model_dir=str(run), mode='lora', lora=LORA, anchor_checkpoint=str(anchor_dir),
      mixture_or_task_name='numeric_arithmetic',
      task_feature_lengths={'inputs': 6, 'targets': 6}, train_steps=6, batch_size=8,
      log_every=3, save_every=3, log=lambda _: None,
      optimizer_fn=functools.partial(optim.make_optimizer, learning_rate=1e-2))
  assert np.isfinite(metrics['loss'])
  state_params = checkpoints.RunCheckpointer(run).restore_params()
  assert set(_flat(state_params)) == {k for k in _flat(abstract_params(ANCHOR, LORA))
                                      if k.endswith(('_lora_a', '_lora_b'))}
  assert any(np.any(v) for k, v in _flat(state_params).items() if k.endswith('_lora_b'))
  # The anchor checkpoint is untouched; the exported LM is it with the trained adapters folded.
  jax.tree.map(np.testing.assert_array_equal, checkpoints.load_lm(anchor_dir)[1], before)
  config, exported = checkpoints.load_lm(run / 'lm')
  assert config == ANCHOR
  want = lora.merge_adapters(trainable.merge_params(state_params, before), LORA)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), exported, want)
  changed = [k for k, v in _flat(exported).items() if not np.array_equal(v, _flat(before)[k])]
  assert changed and all(k.rsplit('/', 1)[-1] in lora.TARGETS for k in changed)
