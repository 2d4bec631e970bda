"""T5X-style runs: resume, interrupted saves, frozen-checkpoint checks, clear errors."""

import functools
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from calm_jax import checkpoints, data, optim, runs
from calm_jax import train as train_lib
from calm_jax.cli import gin_cli
from calm_jax.configs import BridgeConfig, TransformerConfig
from calm_tasks import kv_arithmetic

VOCAB = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).vocab_size
LENGTHS = {'inputs': 6, 'targets': 6}
TINY = TransformerConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=2,
                         num_kv_heads=2, head_dim=16, mlp_dim=64)


def _train(model_dir, **kwargs):
  args = dict(model_dir=str(model_dir), mode='pretrain', mixture_or_task_name='numeric_arithmetic',
              task_feature_lengths=LENGTHS, train_steps=6, batch_size=8, model_config=TINY,
              log_every=3, save_every=3,
              optimizer_fn=functools.partial(optim.make_optimizer, learning_rate=1e-3),
              log=lambda _: None)
  args.update(kwargs)
  return train_lib.train(**args)


@pytest.fixture(scope='module')
def lm(tmp_path_factory):
  """A tiny pretrained LM checkpoint (6 steps)."""
  run = tmp_path_factory.mktemp('pretrain')
  _train(run)
  return run


def _params(run):
  return checkpoints.RunCheckpointer(run).restore_params()


def test_pretrain_writes_what_t5x_users_expect(lm):
  assert (lm / 'config.gin').exists()
  assert (lm / 'lm' / checkpoints.CONFIG_FILE).exists()
  assert checkpoints.RunCheckpointer(lm).latest_step() == 6
  assert any((lm / 'train').iterdir())  # TensorBoard event file.


def test_rerun_of_a_finished_run_changes_nothing(lm):
  before = jax.tree.map(np.asarray, _params(lm))
  _train(lm)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, _params(lm)))


def test_interrupted_save_never_hides_the_previous_checkpoint(tmp_path):
  run = tmp_path / 'run'
  _train(run, train_steps=9)
  reference = jax.tree.map(np.asarray, _params(run))
  interrupted = tmp_path / 'interrupted'
  _train(interrupted, train_steps=9, save_every=6)  # Checkpoints at 6 and 9.
  # A save of step 9 killed half-way: orbax's temporary directory, never renamed.
  (interrupted / 'checkpoints' / '9').rename(
      interrupted / 'checkpoints' / '9.orbax-checkpoint-tmp-1234')
  assert checkpoints.RunCheckpointer(interrupted).latest_step() == 6
  _train(interrupted, train_steps=9, save_every=6)  # Resumes from 6.
  jax.tree.map(np.testing.assert_array_equal, reference,
               jax.tree.map(np.asarray, _params(interrupted)))


def test_compose_refuses_a_frozen_checkpoint_of_another_architecture(lm, tmp_path):
  other = TransformerConfig(**{**TINY.to_dict(), 'mlp_dim': 80})
  with pytest.raises(checkpoints.CheckpointError, match='mlp_dim'):
    _train(tmp_path / 'c', mode='compose', mixture_or_task_name='kv_arithmetic_held_in',
           anchor_checkpoint=str(lm / 'lm'), augment_checkpoints={'augment': str(lm / 'lm')},
           anchor_config=other, bridges={'augment': BridgeConfig(connections=((1, 1),))})


def test_compose_trains_bridges_and_records_what_it_composes(lm, tmp_path):
  run = tmp_path / 'compose'
  _train(run, mode='compose', mixture_or_task_name='kv_arithmetic_held_in',
         anchor_checkpoint=str(lm / 'lm'), augment_checkpoints={'augment': str(lm / 'lm')},
         bridges={'augment': BridgeConfig(connections=((1, 1), (2, 2)))}, train_steps=3)
  params = _params(run)
  assert set(params) == {'bridge'}  # The checkpoint holds the bridges only.
  config, frozen = runs.read_calm_run(run)
  assert config.connections('augment') == ((1, 1), (2, 2))
  assert set(frozen) == {'anchor', 'augments'}


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='nowhere.*does not exist'):
    _train(tmp_path / 'c', mode='compose', anchor_checkpoint=str(tmp_path / 'nowhere'),
           augment_checkpoints={'augment': str(tmp_path / 'nowhere')})


def test_unknown_task_is_named(tmp_path):
  with pytest.raises(data.UnknownTaskError, match="'kv_arithmetics'.*kv_arithmetic_held_in"):
    _train(tmp_path / 'r', mixture_or_task_name='kv_arithmetics')


def test_malformed_gin_is_reported(tmp_path):
  bad = tmp_path / 'bad.gin'
  bad.write_text('MODEL_DIR = (\n')
  gin.clear_config()
  with pytest.raises(gin_cli.GinConfigError, match='Malformed gin'):
    gin_cli.parse_gin([str(bad)], [])
  gin.clear_config()
  with pytest.raises(gin_cli.GinConfigError, match='not found'):
    gin_cli.parse_gin(['runs/no_such_run.gin'], [])
  gin.clear_config()


def test_missing_required_macro_is_reported():
  gin.clear_config()
  try:
    gin_cli.parse_gin(['runs/pretrain.gin'], ["MIXTURE_OR_TASK_NAME = 'numeric_arithmetic'"])
    with pytest.raises(gin_cli.GinConfigError,
                       match=r'train: required gin value\(s\) unset: .*model_dir'):
      gin_cli.call_with_gin(train_lib.train)
  finally:
    gin.clear_config()


def test_t5x_gin_flags_are_rewritten():
  assert gin_cli.rewrite_gin_args(['prog', "--gin.MODEL_DIR='/tmp/x'", '--gin_file=a.gin']) == [
      'prog', "--gin_bindings=MODEL_DIR = '/tmp/x'", '--gin_file=a.gin']


def _cli(model_dir, steps):
  model_gin = model_dir.parent / 'tiny_model.gin'
  model_gin.write_text('\n'.join([
      'from __gin__ import dynamic_registration', 'from calm_jax import configs',
      'MODEL_CONFIG = @configs.TransformerConfig()'] + [
          f'configs.TransformerConfig.{k} = {v!r}' for k, v in TINY.to_dict().items()
          if k in ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads',
                   'head_dim', 'mlp_dim')]))
  return [sys.executable, '-m', 'calm_jax.cli.train', '--gin_file=runs/pretrain.gin',
          '--gin_file=tasks/kv_arithmetic.gin', f'--gin_file={model_gin}',
          f'--gin.MODEL_DIR="{model_dir}"', "--gin.MIXTURE_OR_TASK_NAME='numeric_arithmetic'",
          f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}', f'--gin.TRAIN_STEPS={steps}',
          '--gin.BATCH_SIZE=8', '--gin.train.save_every=2', '--gin.train.log_every=2']


@pytest.mark.slow
def test_sigkill_and_restart_is_bit_identical(tmp_path):
  """calm-train killed with SIGKILL mid-run, then rerun, ends exactly like an unbroken run."""
  steps = 40
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  whole = subprocess.run(_cli(tmp_path / 'whole', steps), capture_output=True, text=True,
                         timeout=600, env=env, check=False)
  assert whole.returncode == 0, whole.stderr[-3000:]
  assert 'tokens/s' in whole.stderr and 'ETA' in whole.stderr
  broken = tmp_path / 'broken'
  process = subprocess.Popen(_cli(broken, steps), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    done = [p for p in (broken / 'checkpoints').glob('*') if p.name.isdigit()] if (
        broken / 'checkpoints').exists() else []
    if any(int(p.name) >= 4 and (p / 'manifest.json').exists() for p in done):
      break  # A sealed checkpoint (its manifest written) to resume from.
    time.sleep(0.05)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  # The newest sealed checkpoint: a save orbax finished but the run had no time to seal before
  # the kill is not trusted, and the restart must set it aside and resume from this one.
  ckpt = checkpoints.RunCheckpointer(broken)
  sealed = []
  for p in (broken / 'checkpoints').glob('*'):
    if p.name.isdigit():
      try:
        ckpt.verify(int(p.name))
      except checkpoints.CorruptCheckpointError:
        continue
      sealed.append(int(p.name))
  killed_at = max(sealed, default=None)
  assert killed_at is not None and 4 <= killed_at < steps, sealed
  resumed = subprocess.run(_cli(broken, steps), capture_output=True, text=True, timeout=600,
                           env=env, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from step {killed_at}' in resumed.stderr
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, _params(tmp_path / 'whole')),
               jax.tree.map(np.asarray, _params(broken)))
