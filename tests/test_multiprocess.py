"""Two processes (jax.distributed over 127.0.0.1) train, save and restore like one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

SCRIPT = 'tests/multiprocess_steps.py'


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(repo_root, devices):
  return dict(os.environ, PYTHONPATH=f'{repo_root}{os.pathsep}{repo_root / "tests"}',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                        '--xla_backend_optimization_level=0')


def _run_together(commands, env, cwd=None):
  """Runs the commands as concurrent processes; asserts they all succeed; returns their stderr."""
  procs = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for command in commands]
  try:
    outputs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outputs]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, repo_root):
  one = tmp_path / 'one'
  one.mkdir()
  result = subprocess.run([sys.executable, str(repo_root / SCRIPT), f'--out={one}'],
                          env=_env(repo_root, 8), capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  two = tmp_path / 'two'
  two.mkdir()
  port = _free_port()
  _run_together([[sys.executable, str(repo_root / SCRIPT), '--num_processes=2',
                  f'--process_id={i}', f'--port={port}', f'--out={two}'] for i in range(2)],
                env=_env(repo_root, 4))

  a, b = np.load(one / 'result.npz'), np.load(two / 'result.npz')
  assert set(a.files) == set(b.files) and len(a.files) > 10
  np.testing.assert_allclose(b['losses'], a['losses'], rtol=0, atol=1e-5)
  for name in a.files:
    np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)
  # Both processes wrote the one checkpoint (orbax, multi-process).
  assert (two / 'run' / 'checkpoints' / '2').is_dir()


TINY_MODEL = {'vocab_size': 0, 'embed_dim': 32, 'num_layers': 2, 'num_heads': 2,
              'num_kv_heads': 2, 'head_dim': 16, 'mlp_dim': 64}


def _calm_train(repo_root, model_dir, port, process_id, steps):
  """The calm-train command line of one of two processes (4 emulated devices each)."""
  from calm_tasks import kv_arithmetic  # pylint: disable=g-import-not-at-top
  vocab = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).vocab_size
  model_gin = model_dir.parent / 'tiny_model.gin'
  model_gin.write_text('\n'.join(
      ['from __gin__ import dynamic_registration', 'from calm_jax import configs',
       'MODEL_CONFIG = @configs.TransformerConfig()'] +
      [f'configs.TransformerConfig.{k} = {vocab if k == "vocab_size" else v!r}'
       for k, v in TINY_MODEL.items()]))
  return [sys.executable, '-m', 'calm_jax.cli.train', f'--coordinator_address=127.0.0.1:{port}',
          '--num_processes=2', f'--process_id={process_id}', '--gin_file=runs/pretrain.gin',
          '--gin_file=meshes/fsdp.gin', '--gin.MESH_MODEL=2', '--gin_file=tasks/kv_arithmetic.gin',
          f'--gin_file={model_gin}', f'--gin.MODEL_DIR="{model_dir}"',
          "--gin.MIXTURE_OR_TASK_NAME='numeric_arithmetic'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 6, 'targets': 6}", f'--gin.TRAIN_STEPS={steps}',
          '--gin.BATCH_SIZE=8', '--gin.train.save_every=2', '--gin.train.log_every=2']


def _run_two(repo_root, model_dir, steps):
  """Runs calm-train as two processes; returns their stderr (process 0 first)."""
  port = _free_port()
  return _run_together([_calm_train(repo_root, model_dir, port, i, steps) for i in range(2)],
                       env=dict(_env(repo_root, 4), PYTHONUNBUFFERED='1'), cwd=repo_root)


@pytest.mark.slow
def test_calm_train_on_two_processes_resumes_exactly(tmp_path, repo_root):
  """`calm-train` itself on two processes (4 devices each, FSDP mesh data=2 x model=2 per host).

  Each process reads its own SeqIO shard, so the batches are not one process's batches (as in
  T5X); the identity shown is that a two-process run that loses its last checkpoint and is run
  again resumes from the one before and ends bit-identical.
  """
  from calm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  first = _run_two(repo_root, run, steps=4)
  # Process 0 logs and writes the run's files; process 1 only its checkpoint shards.
  assert 'mesh {\'replica\': 1, \'data\': 4, \'model\': 2} over 8 devices, 2 process(es)' in first[0]
  assert 'step 4/4' in first[0] and 'tokens/s' in first[0]
  assert 'step 4/4' not in first[1] and 'tokens/s' not in first[1]
  assert (run / 'config.gin').exists() and (run / 'lm' / checkpoints.CONFIG_FILE).exists()
  checkpointer = checkpoints.RunCheckpointer(run)
  assert checkpointer.latest_step() == 4
  final = jax.tree.map(np.asarray, checkpointer.restore_params())
  checkpointer.close()
  (run / 'checkpoints' / '4').rename(tmp_path / 'step_4')  # Lost: the run must redo 3 and 4.
  second = _run_two(repo_root, run, steps=4)
  assert 'resumed from step 2' in second[0]
  checkpointer = checkpoints.RunCheckpointer(run)
  assert checkpointer.latest_step() == 4
  again = jax.tree.map(np.asarray, checkpointer.restore_params())
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, final, again)
  assert len(jax.tree.leaves(final)) > 10
