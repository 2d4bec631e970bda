"""Bad Hugging Face checkpoints and bad LM checkpoints give one clear error naming the culprit.

Also checks that sharded and bfloat16 Hugging Face checkpoints convert faithfully.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from calm_jax import checkpoints
from calm_jax.checkpoints import CheckpointError
from calm_jax.convert import huggingface, tiny_hf
from calm_jax.convert.hf_config import UnsupportedModelError
from calm_jax.convert.safetensors_reader import INDEX_FILE, SINGLE_FILE, SafetensorsReader


def _quiet(_):
  """A log sink that drops progress lines."""


def _convert(hf_dir, out_dir):
  """Converts `hf_dir` into `out_dir` without logging."""
  return huggingface.convert_hf_checkpoint(str(hf_dir), str(out_dir), log=_quiet)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny float32 Llama Hugging Face checkpoint (single file); copy it before breaking it."""
  path = tmp_path_factory.mktemp('hf') / 'llama'
  tiny_hf.save_model(tiny_hf.make_model('llama'), str(path))
  return path


@pytest.fixture(scope='module')
def lm_dir(hf_dir, tmp_path_factory):
  """The conversion of `hf_dir`; copy it before breaking it."""
  path = tmp_path_factory.mktemp('lm') / 'llama'
  _convert(hf_dir, path)
  return path


@pytest.fixture
def broken(hf_dir, tmp_path):
  """A fresh copy of `hf_dir` to break."""
  return shutil.copytree(hf_dir, tmp_path / 'hf')


def _edit_weights(directory, edit):
  """Rewrites `directory/model.safetensors` with `edit(dict of arrays)` applied in place."""
  path = os.path.join(directory, SINGLE_FILE)
  tensors = st_numpy.load_file(path)
  edit(tensors)
  st_numpy.save_file(tensors, path)


def _edit_json(path, edit):
  """Rewrites the JSON file `path` with `edit(parsed document)` applied in place."""
  with open(path) as f:
    document = json.load(f)
  edit(document)
  with open(path, 'w') as f:
    json.dump(document, f)


def test_missing_directory(tmp_path):
  """A nonexistent checkpoint directory is named."""
  with pytest.raises(CheckpointError, match='nowhere.*does not exist'):
    _convert(tmp_path / 'nowhere', tmp_path / 'out')


def test_missing_config(broken, tmp_path):
  """A directory without config.json says so."""
  os.remove(broken / 'config.json')
  with pytest.raises(CheckpointError, match='config.json'):
    _convert(broken, tmp_path / 'out')


def test_malformed_config(broken, tmp_path):
  """A config.json that is not JSON is named."""
  (broken / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(CheckpointError, match='config.json is not valid JSON'):
    _convert(broken, tmp_path / 'out')


def test_missing_weights(broken, tmp_path):
  """Without weights the error names the expected file; nothing is written."""
  os.remove(broken / SINGLE_FILE)
  with pytest.raises(CheckpointError, match=r'model\.safetensors'):
    _convert(broken, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_missing_shard(tmp_path):
  """A shard named by the index but absent is named."""
  hf = tmp_path / 'hf'
  tiny_hf.save_model(tiny_hf.make_model('llama'), str(hf), max_shard_size='20KB')
  with open(hf / INDEX_FILE) as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  assert len(shards) > 1
  os.remove(hf / shards[1])
  with pytest.raises(CheckpointError, match=shards[1].replace('.', r'\.')):
    _convert(hf, tmp_path / 'out')


def test_unknown_model_type(broken, tmp_path):
  """An unknown model_type is named with the supported ones."""
  _edit_json(broken / 'config.json', lambda c: c.update(model_type='gpt_neox'))
  with pytest.raises(UnsupportedModelError, match="'gpt_neox'; supported: llama, mistral"):
    _convert(broken, tmp_path / 'out')
  assert issubclass(UnsupportedModelError, CheckpointError)


def test_wrong_shape(broken, tmp_path):
  """A tensor of the wrong shape is named with both shapes."""
  name = 'model.layers.1.self_attn.k_proj.weight'

  def edit(tensors):
    tensors[name] = np.zeros((tensors[name].shape[0] + 2, tensors[name].shape[1]), np.float32)

  _edit_weights(broken, edit)
  with pytest.raises(CheckpointError, match=rf'{name} has shape \(26, 48\), expected \(24, 48\)'):
    _convert(broken, tmp_path / 'out')


def test_missing_tensor(broken, tmp_path):
  """A missing tensor is named with the parameter it fills."""
  name = 'model.layers.2.mlp.up_proj.weight'
  _edit_weights(broken, lambda tensors: tensors.pop(name))
  with pytest.raises(CheckpointError, match=rf'{name} \(for layer_2/mlp/up\) is missing'):
    _convert(broken, tmp_path / 'out')


def test_unexpected_tensor(broken, tmp_path):
  """A tensor with no place in the model is named."""
  name = 'model.layers.0.mlp.extra.weight'
  _edit_weights(broken, lambda tensors: tensors.update({name: np.ones((4, 4), np.float32)}))
  with pytest.raises(CheckpointError, match=rf'1 tensor\(s\) with no place in the model: {name}$'):
    _convert(broken, tmp_path / 'out')


def test_truncated_weights(broken, tmp_path):
  """A weights file cut short is named with the first tensor past its end."""
  path = broken / SINGLE_FILE
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(CheckpointError, match=rf'{SINGLE_FILE} is truncated: tensor \S+ lies'):
    _convert(broken, tmp_path / 'out')


@pytest.mark.parametrize('index', ['{not json', '{}'])
def test_malformed_index(broken, tmp_path, index):
  """An unreadable shard index is named."""
  (broken / INDEX_FILE).write_text(index)
  with pytest.raises(CheckpointError, match=rf'{INDEX_FILE} is not a valid safetensors index'):
    _convert(broken, tmp_path / 'out')


def test_wrong_architecture_is_refused_before_writing(broken, tmp_path):
  """`expected` (calm-convert --expect_preset) refuses another architecture, writing nothing."""
  config = _convert(broken, tmp_path / 'first')
  other = dataclasses.replace(config, num_layers=config.num_layers + 1, attention_types=())
  with pytest.raises(CheckpointError, match='num_layers'):
    huggingface.convert_hf_checkpoint(str(broken), str(tmp_path / 'out'), expected=other,
                                      log=_quiet)
  assert not (tmp_path / 'out').exists()


def test_output_already_holds_checkpoint(hf_dir, lm_dir):
  """Converting onto an existing checkpoint fails and leaves it alone."""
  before = (lm_dir / 'config.json').read_text()
  with pytest.raises(CheckpointError, match='already holds a checkpoint'):
    _convert(hf_dir, lm_dir)
  assert (lm_dir / 'config.json').read_text() == before


def test_load_missing_path(tmp_path):
  """Loading a nonexistent LM checkpoint names it."""
  with pytest.raises(CheckpointError, match='nowhere does not exist'):
    checkpoints.load_lm(tmp_path / 'nowhere')


def test_load_without_config(tmp_path):
  """A directory without config.json is not an LM checkpoint."""
  (tmp_path / 'params').mkdir()
  with pytest.raises(CheckpointError, match='has no config.json'):
    checkpoints.load_lm(tmp_path)


def test_load_with_other_config(lm_dir):
  """A caller config that differs from the stored one names the field."""
  stored = checkpoints.load_lm_config(lm_dir)
  other = dataclasses.replace(stored, num_layers=2)
  with pytest.raises(CheckpointError, match=r"does not match.*'num_layers': \(3, 2\)"):
    checkpoints.load_lm(lm_dir, config=other)


def test_load_with_edited_mlp_dim(lm_dir, tmp_path):
  """A stored config that does not fit the parameters names one and both shapes."""
  edited = shutil.copytree(lm_dir, tmp_path / 'lm')
  _edit_json(edited / 'config.json', lambda d: d['config'].update(mlp_dim=80))
  # The first mismatching MLP matrix is down [F, D] or gating/up [D, F], with F 64 -> 80.
  with pytest.raises(CheckpointError, match=(r"parameter \S*'mlp'\S* has shape "
                                             r"\((64, 48|48, 64)\), the config needs "
                                             r"\((80, 48|48, 80)\)")):
    checkpoints.load_lm(edited)


def test_sharded_and_bfloat16_convert(hf_dir, lm_dir, tmp_path):
  """Sharding changes nothing; bfloat16 weights are kept exactly, as bfloat16."""
  sharded = tmp_path / 'sharded'
  tiny_hf.save_model(tiny_hf.make_model('llama'), str(sharded), max_shard_size='20KB')
  assert (sharded / INDEX_FILE).exists()
  assert not (sharded / SINGLE_FILE).exists()
  _convert(sharded, tmp_path / 'sharded_lm')
  _, expected = checkpoints.load_lm(lm_dir)
  _, actual = checkpoints.load_lm(tmp_path / 'sharded_lm')
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))

  bf16 = tmp_path / 'bf16'
  tiny_hf.save_model(tiny_hf.make_model('llama'), str(bf16), dtype='bfloat16')
  assert _convert(bf16, tmp_path / 'bf16_lm').param_dtype == 'bfloat16'
  document = json.loads((tmp_path / 'bf16_lm' / 'config.json').read_text())
  assert document['config']['param_dtype'] == 'bfloat16'
  config, params = checkpoints.load_lm(tmp_path / 'bf16_lm')
  assert config.param_dtype == 'bfloat16'
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {'bfloat16'}
  hf_embedding = SafetensorsReader(str(bf16)).get('model.embed_tokens.weight')
  assert str(hf_embedding.dtype) == 'bfloat16'
  np.testing.assert_array_equal(
      np.asarray(params['embedder']['input_embedding']).astype(np.float32),
      np.asarray(hf_embedding).astype(np.float32))
