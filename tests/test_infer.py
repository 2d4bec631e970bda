"""calm-infer, calm-export and calm-eval on a real (tiny) composition run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import checkpoints, composed, data, decoding, partitioning, runs
from calm_jax import eval as eval_lib
from calm_jax import export as export_lib
from calm_jax import infer as infer_lib
from calm_jax.calm import Calm
from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import BridgeConfig
from calm_tasks import kv_arithmetic  # pylint: disable=unused-import

from test_runs import LENGTHS, _train

TASK = 'kv_arithmetic_held_out'
EXAMPLES = 6


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny pretrained LM composed with itself through live bridges (a few steps each)."""
  root = tmp_path_factory.mktemp('runs')
  _train(root / 'lm')
  _train(root / 'calm', mode='compose', mixture_or_task_name='kv_arithmetic_held_in',
         anchor_checkpoint=str(root / 'lm' / 'lm'), augment_checkpoints={'augment': str(root / 'lm' / 'lm')},
         bridges={'augment': BridgeConfig(connections=((1, 1), (2, 2)), zero_init_out=False)}, train_steps=3)
  return root / 'calm'


def _predictions(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _features(n):
  ds = data.get_dataset(TASK, LENGTHS, 'validation', n, shuffle=False, num_epochs=1)
  return next(ds.as_numpy_iterator())


def test_infer_writes_t5x_style_jsonl_equal_to_the_reference_decoder(run, tmp_path):
  written = infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK,
                            task_feature_lengths=LENGTHS, output_dir=str(tmp_path),
                            batch_size=4, num_examples=EXAMPLES, log=lambda _: None)
  path = tmp_path / f'{TASK}-000003.jsonl'  # The run's step.
  assert written == {TASK: str(path)}
  records = _predictions(path)
  assert len(records) == EXAMPLES
  assert all({'inputs', 'targets', 'prediction', 'prediction_tokens'} <= set(r) for r in records)
  # Same tokens as the uncached argmax loop over full forward passes, example by example.
  loaded = runs.load_checkpoint(str(run))
  features = _features(EXAMPLES)
  eos = kv_arithmetic.vocabulary(kv_arithmetic.kv_data.KVSpec()).eos_id

  def reference(params, tokens, prompt):
    def logits_fn(t):
      return loaded.model.apply({'params': params}, t, prompt_mask=prompt).logits
    return decoding.greedy_decode(logits_fn, tokens, prompt, LENGTHS['targets'], eos)

  expected = np.asarray(jax.jit(reference)(loaded.params, features['decoder_input_tokens'],
                                           features['decoder_causal_attention']))
  np.testing.assert_array_equal([r['prediction_tokens'] for r in records], expected)


def test_export_then_infer_gives_the_same_predictions(run, tmp_path):
  out = tmp_path / 'export'
  result = export_lib.export(checkpoint=str(run), output_dir=str(out), mixture_or_task_name=TASK,
                             serving_prompt_length=LENGTHS['inputs'] + LENGTHS['targets'],
                             max_decode_len=LENGTHS['targets'], log=lambda _: None)
  assert result.metadata['step'] == 3
  assert result.vocabulary.eos_id == 1
  for checkpoint, name in ((run, 'a'), (out, 'b')):
    infer_lib.infer(checkpoint=str(checkpoint), mixture_or_task_name=TASK,
                    task_feature_lengths=LENGTHS, output_dir=str(tmp_path / name),
                    batch_size=4, num_examples=EXAMPLES, log=lambda _: None)
  a = _predictions(tmp_path / 'a' / f'{TASK}-000003.jsonl')
  b = _predictions(tmp_path / 'b' / f'{TASK}-000003.jsonl')
  assert a == b
  # The serving artifact on the same examples (batch 6 through a symbolic batch dimension).
  features = _features(EXAMPLES)
  serve = composed.load_serving(out)
  tokens = serve(result.params, features['decoder_input_tokens'].astype(np.int32),
                 features['decoder_causal_attention'].astype(np.int32),
                 jax.random.key_data(jax.random.key(0)))
  np.testing.assert_array_equal(tokens, [r['prediction_tokens'] for r in a])


def test_eval_metrics_agree_with_the_predictions(run, tmp_path):
  metrics = eval_lib.evaluate(checkpoint=str(run), mixture_or_task_name=TASK,
                              task_feature_lengths=LENGTHS, batch_size=4,
                              eval_dir=str(tmp_path), num_examples=EXAMPLES)
  infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                  output_dir=str(tmp_path / 'p'), batch_size=4, num_examples=EXAMPLES,
                  log=lambda _: None)
  records = _predictions(tmp_path / 'p' / f'{TASK}-000003.jsonl')
  accuracy = 100 * np.mean([r['prediction'] == r['targets'] for r in records])
  assert metrics[TASK]['accuracy'] == pytest.approx(accuracy)


def test_export_refuses_an_lm_checkpoint(run, tmp_path):
  with pytest.raises(CheckpointError, match='LM checkpoint'):
    export_lib.export(checkpoint=str(run.parent / 'lm' / 'lm'), output_dir=str(tmp_path / 'x'),
                      log=lambda _: None)
  with pytest.raises(CheckpointError, match='does not exist'):
    runs.load_checkpoint(str(tmp_path / 'nowhere'))


def test_calm_infer_command_line(run, tmp_path, repo_root):
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.infer', '--gin_file=runs/infer.gin',
       '--gin_file=tasks/kv_arithmetic.gin', f'--gin.CHECKPOINT="{run}"',
       f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
       f'--gin.INFER_OUTPUT_DIR="{tmp_path}"', '--gin.BATCH_SIZE=4',
       '--gin.infer.num_examples=3', '--gin.infer.num_beams=2'],
      capture_output=True, text=True, timeout=600, cwd=repo_root, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_predictions(tmp_path / f'{TASK}-000003.jsonl')) == 3


@pytest.mark.slow
def test_calm_infer_on_a_mesh_matches_one_device(run, tmp_path, repo_root):
  # The mesh gin file on 8 emulated devices (data 4 x model 2): the same beam-search JSONL as
  # one device.
  infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                  output_dir=str(tmp_path / 'one'), batch_size=4, num_examples=EXAMPLES,
                  num_beams=2, log=lambda _: None)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  common = ['--gin_file=tasks/kv_arithmetic.gin', '--gin_file=meshes/default.gin',
            '--gin.MESH_MODEL=2', f'--gin.CHECKPOINT="{run}"', f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"',
            f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}', '--gin.BATCH_SIZE=4']
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.infer', '--gin_file=runs/infer.gin', *common,
       f'--gin.INFER_OUTPUT_DIR="{tmp_path / "mesh"}"', f'--gin.infer.num_examples={EXAMPLES}',
       '--gin.infer.num_beams=2'],
      capture_output=True, text=True, timeout=600, cwd=repo_root, check=False, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "decoding on mesh {'replica': 1, 'data': 4, 'model': 2}" in result.stderr
  assert (_predictions(tmp_path / 'mesh' / f'{TASK}-000003.jsonl')
          == _predictions(tmp_path / 'one' / f'{TASK}-000003.jsonl'))
  # A batch the mesh does not divide is refused with the reason.
  bad = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.infer', '--gin_file=runs/infer.gin', *common,
       f'--gin.INFER_OUTPUT_DIR="{tmp_path / "bad"}"', '--gin.BATCH_SIZE=6'],
      capture_output=True, text=True, timeout=600, cwd=repo_root, check=False, env=env)
  assert bad.returncode != 0 and 'does not divide' in bad.stderr


@pytest.mark.slow
def test_two_process_calm_infer_writes_the_single_process_jsonl(run, tmp_path, repo_root):
  # Two processes (jax.distributed over 127.0.0.1, 4 emulated devices each, mesh data 4 x
  # model 2 across them): each feeds its devices' rows, process 0 writes the one file.
  from test_multiprocess import _env, _free_port, _run_together  # pylint: disable=g-import-not-at-top
  infer_lib.infer(checkpoint=str(run), mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                  output_dir=str(tmp_path / 'one'), batch_size=4, num_examples=EXAMPLES,
                  log=lambda _: None)
  port = _free_port()
  commands = [[sys.executable, '-m', 'calm_jax.cli.infer', f'--coordinator_address=127.0.0.1:{port}',
               '--num_processes=2', f'--process_id={i}', '--gin_file=runs/infer.gin',
               '--gin_file=tasks/kv_arithmetic.gin', '--gin_file=meshes/default.gin',
               '--gin.MESH_MODEL=2', f'--gin.CHECKPOINT="{run}"',
               f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
               f'--gin.INFER_OUTPUT_DIR="{tmp_path / "two"}"', '--gin.BATCH_SIZE=4',
               f'--gin.infer.num_examples={EXAMPLES}'] for i in range(2)]
  errors = _run_together(commands, env=_env(repo_root, 4), cwd=repo_root)
  assert "decoding on mesh {'replica': 1, 'data': 4, 'model': 2}" in errors[0]
  assert 'decoding on mesh' not in errors[1]  # Only process 0 logs.
  assert (_predictions(tmp_path / 'two' / f'{TASK}-000003.jsonl')
          == _predictions(tmp_path / 'one' / f'{TASK}-000003.jsonl'))
  assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == [f'{TASK}-000003.jsonl']


@pytest.fixture(scope='module')
def one_device_export(run, tmp_path_factory):
  """The run's composed checkpoint and serving artifact, exported on one device."""
  out = tmp_path_factory.mktemp('exports') / 'one'
  export_lib.export(checkpoint=str(run), output_dir=str(out), mixture_or_task_name=TASK,
                    serving_prompt_length=LENGTHS['inputs'] + LENGTHS['targets'],
                    max_decode_len=LENGTHS['targets'], log=lambda _: None)
  return out


@pytest.mark.slow
def test_restore_and_export_on_a_mesh(run, one_device_export, tmp_path, repo_root):
  # 8 emulated devices, data 4 x model 2 (tests/sharded_restore.py): the run, its anchor LM and
  # the export restore straight into the decoder's shardings with the one-device values, and
  # the mesh's serving artifact writes the one-device artifact's tokens.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8', PYTHONPATH=str(repo_root))
  result = subprocess.run(
      [sys.executable, str(repo_root / 'tests' / 'sharded_restore.py'), str(run),
       str(one_device_export), str(tmp_path / 'mesh')],
      capture_output=True, text=True, timeout=600, cwd=repo_root / 'tests', check=False, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report['devices'] == 8
  for kind in ('run', 'lm', 'export'):
    row = report[kind]
    assert row['elsewhere'] == 0 and row['in_place'] > 0, kind  # Every leaf where it decodes.
    assert 0 < row['split'] < row['in_place'], kind  # Heads / MLP / vocab split, norms not.
    assert row['equal'], kind
  # Only what the composition reads is restored: the augment LM's final norm is not.
  restored, whole = set(report['run']['paths']), set(report['run']['reference_paths'])
  assert restored == set(report['run']['expected_paths']) and restored < whole
  assert whole - restored == {"['augments']['augment']['final_norm']['scale']"}
  signature = report['export']['signature']
  assert signature['devices'] == 8 and signature['mesh'] == {'replica': 1, 'data': 4, 'model': 2}
  assert signature['inputs']['input_tokens'][0] == '4*b'  # The batch splits over data.
  assert report['serving']['mesh'] == report['serving']['one']
  assert report['serving']['spec'][0] in ('data', ['replica', 'data'])


@pytest.mark.slow
def test_two_process_calm_export_writes_the_one_process_checkpoint(run, one_device_export,
                                                                  tmp_path, repo_root):
  # Two processes (4 emulated devices each, mesh data 4 x model 2 across them): each restores
  # and writes its own shards, process 0 the config; the result equals the one-device export.
  from test_multiprocess import _env, _free_port, _run_together  # pylint: disable=g-import-not-at-top
  port = _free_port()
  out = tmp_path / 'two'
  commands = [[sys.executable, '-m', 'calm_jax.cli.export', f'--coordinator_address=127.0.0.1:{port}',
               '--num_processes=2', f'--process_id={i}', '--gin_file=runs/export.gin',
               '--gin_file=tasks/kv_arithmetic.gin', '--gin_file=meshes/default.gin',
               '--gin.MESH_MODEL=2', f'--gin.CHECKPOINT="{run}"', f'--gin.EXPORT_DIR="{out}"',
               f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"'] for i in range(2)]
  errors = _run_together(commands, env=_env(repo_root, 4), cwd=repo_root)
  assert "exporting on mesh {'replica': 1, 'data': 4, 'model': 2}" in errors[0]
  assert 'exporting on mesh' not in errors[1]  # Only process 0 logs.
  two, one = composed.load_composed(out), composed.load_composed(one_device_export)
  assert two.config == one.config and two.metadata == one.metadata
  assert two.vocabulary.eos_id == one.vocabulary.eos_id
  flat_two, flat_one = (checkpoints.flat_paths(x.params) for x in (two, one))
  assert set(flat_two) <= set(flat_one)
  for key, value in flat_two.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_one[key]), err_msg=key)


def test_mesh_placement_refuses_an_own_tokenizer_composition(tmp_path):
  # Refused when the shardings are asked for, i.e. before a checkpoint file is read.
  from test_alignment import _config  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, model=1),
                                devices=jax.devices()[:1])
  placement = decoding.mesh_placement(mesh, partitioning.MeshConfig().rules())
  assert placement(Calm(_config(40, 40, own=False)))  # Without its own tokenizer.
  with pytest.raises(ValueError, match="own tokenizer \\(\\['aug'\\]\\)"):
    placement(Calm(_config(40, 30)))
