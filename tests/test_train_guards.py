"""Training never writes an unhealthy state and never resumes another run silently."""

import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import checkpoints, optim
from calm_jax import train as train_lib
from calm_jax.configs import BridgeConfig

from test_runs import _train

HELD_IN = 'kv_arithmetic_held_in'
BRIDGE = {'augment': BridgeConfig(connections=((1, 1),))}


def _fault_at(step: int, update: Callable[[jax.Array], jax.Array]):
  """An optimizer that turns step `step`'s update (1-based) into `update(u)`."""
  def optimizer_fn(total_steps):
    base, schedule = optim.make_optimizer(total_steps=total_steps, learning_rate=1e-3)

    def init(params):
      return (base.init(params), jnp.zeros((), jnp.int32))

    def apply(updates, state, params=None):
      inner, count = state
      updates, inner = base.update(updates, inner, params)
      faulty = jax.tree.map(update, updates)
      updates = jax.tree.map(lambda u, f: jnp.where(count + 1 == step, f, u), updates, faulty)
      return updates, (inner, count + 1)
    return optax.GradientTransformation(init, apply), schedule
  return optimizer_fn



def _steps(run):
  return sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())


def test_nan_at_a_step_that_is_not_logged_never_reaches_disk(tmp_path):
  """NaN at step 5 with log_every=4, save_every=3: before, steps 6, 9, 12 were saved NaN."""
  run = tmp_path / 'run'
  with pytest.raises(train_lib.TrainingDivergedError,
                     match=r'step 5: non-finite.*step 3, is kept'):
    _train(run, train_steps=12, log_every=4, save_every=3,
           optimizer_fn=_fault_at(5, lambda u: u * jnp.nan))
  assert _steps(run) == [3]
  params = checkpoints.RunCheckpointer(run).restore_params()
  assert not checkpoints.nonfinite_leaves(params)
  assert not (run / 'lm').exists()  # Nothing exported from the broken run either.


def test_diverged_parameters_with_a_finite_loss_stop_the_run(tmp_path):
  run = tmp_path / 'run'
  with pytest.raises(train_lib.TrainingDivergedError, match=r'step 2: parameters diverged'):
    _train(run, train_steps=6, log_every=3, save_every=3,
           optimizer_fn=_fault_at(2, lambda u: u + 1e30))
  assert not (run / 'checkpoints').exists() or _steps(run) == []


def test_healthy_metrics_carry_the_flags(tmp_path):
  last = _train(tmp_path / 'run', train_steps=3, log_every=3, save_every=3)
  assert last['finite'] == 1.0
  assert 0 < last['param_max_abs'] < 10


@pytest.fixture(scope='module')
def two_lms(tmp_path_factory):
  """Two tiny pretrained LMs of one architecture (different seeds)."""
  root = tmp_path_factory.mktemp('lms')
  for seed in (0, 1):
    _train(root / f'lm{seed}', seed=seed, train_steps=3, log_every=3, save_every=3)
  return str(root / 'lm0' / 'lm'), str(root / 'lm1' / 'lm')


def _compose(run, anchor, augment, **kwargs):
  args = dict(mode='compose', mixture_or_task_name=HELD_IN, anchor_checkpoint=anchor,
              augment_checkpoints={'augment': augment}, bridges=BRIDGE, train_steps=3,
              log_every=3, save_every=3)
  args.update(kwargs)
  return _train(run, **args)


def test_resume_with_anchor_and_augment_swapped_is_refused(two_lms, tmp_path):
  a, b = two_lms
  run = tmp_path / 'compose'
  _compose(run, a, b)
  before = (run / 'calm_run.json').read_text()
  with pytest.raises(train_lib.RunDefinitionError,
                     match=r'holds another run.*anchor: recorded.*augments\.augment: recorded'):
    _compose(run, b, a, train_steps=6)
  assert (run / 'calm_run.json').read_text() == before  # Nothing of the other run written.
  assert _steps(run) == [3]


def test_resume_with_another_batch_or_bridge_is_refused(two_lms, tmp_path):
  a, b = two_lms
  run = tmp_path / 'compose'
  _compose(run, a, b)
  with pytest.raises(train_lib.RunDefinitionError, match=r'batch_size: recorded 8, now 4'):
    _compose(run, a, b, batch_size=4, train_steps=6)
  with pytest.raises(train_lib.RunDefinitionError, match=r'bridges\.augment\.connections'):
    _compose(run, a, b, train_steps=6,
             bridges={'augment': BridgeConfig(connections=((2, 2),))})


def test_allow_definition_change_resumes_with_a_warning(two_lms, tmp_path):
  a, b = two_lms
  run = tmp_path / 'compose'
  _compose(run, a, b)
  warnings = []
  _compose(run, a, b, train_steps=6, batch_size=4, allow_definition_change=True,
           warn=warnings.append)
  assert _steps(run) == [3, 6]
  assert any('changed definition' in w and 'batch_size' in w for w in warnings)
  recorded = json.loads((run / train_lib.DEFINITION_FILE).read_text())['definition']
  assert recorded['batch_size'] == 4


def test_a_copied_frozen_checkpoint_is_the_same_run(two_lms, tmp_path):
  """Frozen models count by fingerprint, not path: a copy resumes."""
  import shutil  # pylint: disable=g-import-not-at-top
  a, b = two_lms
  copy = tmp_path / 'copy_of_anchor'
  shutil.copytree(a, copy)
  run = tmp_path / 'compose'
  _compose(run, a, b)
  _compose(run, str(copy), b, train_steps=6)
  assert _steps(run) == [3, 6]


def test_train_steps_at_or_below_the_checkpoint_says_so(tmp_path):
  run = tmp_path / 'run'
  _train(run, train_steps=6)
  before = jax.tree.map(np.asarray, checkpoints.RunCheckpointer(run).restore_params())
  lines = []
  _train(run, train_steps=3, log=lines.append)
  assert any('nothing to train' in line and 'step 6' in line and 'TRAIN_STEPS is 3' in line
             for line in lines)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, checkpoints.RunCheckpointer(run).restore_params()))


def test_definition_differences_name_every_changed_entry():
  stored = {'a': 1, 'b': {'c': [1, 2], 'd': 'x'}}
  current = {'a': 1, 'b': {'c': [1, 3]}, 'e': True}
  assert train_lib.definition_differences(stored, current) == [
      'b.c: recorded [1, 2], now [1, 3]', "b.d: recorded 'x', now '(absent)'",
      "e: recorded '(absent)', now True"]
  assert not train_lib.definition_differences(stored, stored)


def test_a_run_directory_as_anchor_suggests_its_lm_folder(two_lms, tmp_path):
  a, b = two_lms
  run_dir = a.rsplit('/', 1)[0]
  with pytest.raises(checkpoints.CheckpointError, match=rf'did you mean {run_dir}/lm\?'):
    _compose(tmp_path / 'compose', run_dir, b)


def test_blocked_attention_trains_the_same_bridges(two_lms, tmp_path):
  # ATTENTION_BLOCK_SIZE changes how attention is computed, not what: the same losses and
  # the same trained bridges as materialised masks, after three AdamW steps.
  a, b = two_lms
  plain = _compose(tmp_path / 'plain', a, b)
  blocked = _compose(tmp_path / 'blocked', a, b, attention_block_size=4)
  np.testing.assert_allclose(blocked['loss'], plain['loss'], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               checkpoints.RunCheckpointer(tmp_path / 'blocked').restore_params(),
               checkpoints.RunCheckpointer(tmp_path / 'plain').restore_params())
  with pytest.raises(Exception, match='ATTENTION_BLOCK_SIZE'):
    _compose(tmp_path / 'bad', a, b, attention_block_size=0)


def test_a_chunked_loss_trains_the_same_bridges(two_lms, tmp_path):
  # LOSS_CHUNK_SIZE changes how the loss is computed, not what (losses and trained bridges
  # after three AdamW steps), whether the chunk divides the length or not.
  a, b = two_lms
  plain = _compose(tmp_path / 'plain', a, b)
  for chunk in (3, 5):
    chunked = _compose(tmp_path / f'chunked_{chunk}', a, b, loss_chunk_size=chunk)
    np.testing.assert_allclose(chunked['loss'], plain['loss'], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 checkpoints.RunCheckpointer(tmp_path / f'chunked_{chunk}').restore_params(),
                 checkpoints.RunCheckpointer(tmp_path / 'plain').restore_params())
  with pytest.raises(Exception, match='LOSS_CHUNK_SIZE'):
    _compose(tmp_path / 'bad', a, b, loss_chunk_size=-1)


def test_compose_restores_only_what_the_composition_reads(tmp_path):
  # The augment's head and its layers above the deepest connection are never restored into
  # the frozen tree; what is restored equals the checkpoint.
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from calm_jax import calm as calm_lib  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import CalmConfig, TransformerConfig  # pylint: disable=g-import-not-at-top
  from calm_jax.random_init import random_like  # pylint: disable=g-import-not-at-top
  from calm_jax.transformer import abstract_params  # pylint: disable=g-import-not-at-top
  anchor = TransformerConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2,
                             num_kv_heads=2, head_dim=8, mlp_dim=32)
  augment = dataclasses.replace(anchor, num_layers=4)
  stored = {}
  for name, config in (('anchor', anchor), ('augment', augment)):
    stored[name] = random_like(nn.unbox(abstract_params(config)), seed=len(name))
    checkpoints.save_lm(tmp_path / name, config, stored[name])
  bridges = {'aug': BridgeConfig(connections=((1, 1), (2, 2)))}
  setup = train_lib.build_setup(
      'compose', seed=0, model_config=None, anchor_checkpoint=str(tmp_path / 'anchor'),
      augment_checkpoints={'aug': str(tmp_path / 'augment')}, bridges=bridges,
      augment_as_encoder=False, trainable_patterns=None, anchor_config=None,
      augment_configs=None)
  restored = checkpoints.flat_paths(setup.frozen['augments']['aug'])
  composition = CalmConfig(anchor=anchor, augments={'aug': augment}, bridges=bridges)
  read = checkpoints.flat_paths(nn.unbox(calm_lib.abstract_params(composition))['augments']['aug'])
  whole = checkpoints.flat_paths(stored['augment'])
  assert set(restored) == set(read) and set(read) < set(whole)
  assert not any(k.startswith(("['layer_3']", "['final_norm']")) for k in restored)
  for key, value in restored.items():
    np.testing.assert_array_equal(np.asarray(value), whole[key], err_msg=key)
  # A frozen checkpoint of another architecture is still refused, naming the difference.
  with pytest.raises(checkpoints.CheckpointError, match='does not match the expected model'):
    train_lib.build_setup(
        'compose', seed=0, model_config=None, anchor_checkpoint=str(tmp_path / 'anchor'),
        augment_checkpoints={'aug': str(tmp_path / 'augment')}, bridges=bridges,
        augment_as_encoder=False, trainable_patterns=None, anchor_config=None,
        augment_configs={'aug': anchor})
