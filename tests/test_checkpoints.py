"""LM checkpoints: exact round trip, restore into given shardings, config checks."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoints
from calm_jax.configs import TransformerConfig

CONFIG = TransformerConfig(vocab_size=50, embed_dim=16, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=8, mlp_dim=24, param_dtype='bfloat16')


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  from calm_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
  params = nn.unbox(Transformer(CONFIG).init(jax.random.key(3),
                                             jnp.zeros((1, 2), jnp.int32))['params'])
  path = tmp_path_factory.mktemp('ckpt') / 'lm'
  checkpoints.save_lm(str(path), CONFIG, params, metadata={'note': 'test'})
  return path, params


def test_round_trip_is_exact(saved):
  path, params = saved
  config, restored = checkpoints.load_lm(str(path))
  assert config == CONFIG
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, restored)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored))
  document = json.loads((path / checkpoints.CONFIG_FILE).read_text())
  assert document['format'] == checkpoints.FORMAT
  assert document['metadata'] == {'note': 'test'}


def test_restores_into_requested_sharding(saved):
  path, _ = saved
  device = jax.devices()[-1]
  sharding = jax.sharding.SingleDeviceSharding(device)
  _, restored = checkpoints.load_lm(str(path), shardings=sharding)
  for leaf in jax.tree.leaves(restored):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding == sharding


def test_save_refuses_params_of_another_config(tmp_path, saved):
  _, params = saved
  with pytest.raises(checkpoints.CheckpointError, match='num_layers|layer_1|missing'):
    checkpoints.save_lm(str(tmp_path / 'lm'),
                        TransformerConfig(**{**CONFIG.to_dict(), 'num_layers': 3}), params)


def test_unknown_format_is_refused(saved, tmp_path):
  path, _ = saved
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / checkpoints.CONFIG_FILE).write_text(json.dumps({'format': 'other/9', 'config': {}}))
  with pytest.raises(checkpoints.CheckpointError, match='unknown format'):
    checkpoints.load_lm_config(str(bad))
