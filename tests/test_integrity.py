"""Corrupt checkpoints are caught before they are used: flipped bytes and truncated files in LM,
run and composed checkpoints; training falls back to the newest intact one, everything else
stops with one line naming the checkpoint and the file."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoints, composed, integrity, runs

from test_runs import _train


def _data_file(directory: pathlib.Path) -> pathlib.Path:
  """The largest data file orbax wrote under `directory` (array bytes, not metadata)."""
  files = [p for p in directory.rglob('*') if p.is_file() and '/d/' in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(file: pathlib.Path) -> None:
  data = bytearray(file.read_bytes())
  middle = len(data) // 2
  for i in range(middle, min(middle + 8, len(data))):
    data[i] ^= 0xFF
  file.write_bytes(bytes(data))


def _truncate(file: pathlib.Path) -> None:
  file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


CORRUPTIONS = {'flipped': (_flip, r'has changed since it was written \(SHA-256 differs\)'),
               'truncated': (_truncate, r'has \d+ bytes, \d+ were written')}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny pretrain run with checkpoints at steps 3 and 6 and its LM checkpoint."""
  path = tmp_path_factory.mktemp('integrity') / 'run'
  _train(path)
  return path


@pytest.fixture(scope='module')
def resumed_from_3(run, tmp_path_factory):
  """The parameters of `run` resumed from step 3 to 9, as if step 6 had never been saved."""
  reference = tmp_path_factory.mktemp('reference') / 'run'
  shutil.copytree(run, reference)
  shutil.rmtree(reference / 'checkpoints' / '6')
  _train(reference, train_steps=9)
  return jax.tree.map(np.asarray, checkpoints.RunCheckpointer(reference).restore_params())


@pytest.fixture
def copy(run, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(run, target)
  return target


def _relative(file, root):
  return str(file.relative_to(root))


def test_manifest_lists_every_file_and_detects_each_change(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a').write_bytes(b'abc')
  (tmp_path / 'sub' / 'b').write_bytes(b'0123456789')
  integrity.write_manifest(tmp_path)
  assert set(integrity.read_manifest(tmp_path)) == {'a', 'sub/b'}
  assert integrity.verify_manifest(tmp_path) == []
  (tmp_path / 'a').write_bytes(b'abd')
  (tmp_path / 'sub' / 'b').write_bytes(b'01234')
  assert integrity.verify_manifest(tmp_path) == [
      'a has changed since it was written (SHA-256 differs)',
      'sub/b has 5 bytes, 10 were written']
  (tmp_path / 'a').unlink()
  assert integrity.verify_manifest(tmp_path)[0] == 'a is missing'
  (tmp_path / integrity.MANIFEST_FILE).unlink()
  assert 'missing or unreadable' in integrity.verify_manifest(tmp_path)[0]


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_lm_checkpoint_is_one_error_naming_the_file(copy, kind):
  corrupt, message = CORRUPTIONS[kind]
  file = _data_file(copy / 'lm' / checkpoints.PARAMS_DIR)
  corrupt(file)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f'LM checkpoint .*lm is corrupt: {_relative(file, copy / "lm")} '
                           f'{message}'):
    checkpoints.load_lm(copy / 'lm')
  with pytest.raises(checkpoints.CorruptCheckpointError, match='is corrupt'):
    runs.load_checkpoint(copy / 'lm')  # What calm-eval, calm-infer and calm-export call.


def test_lm_checkpoint_without_checksums_loads_with_a_warning(copy, caplog):
  config_file = copy / 'lm' / checkpoints.CONFIG_FILE
  document = json.loads(config_file.read_text())
  del document['files']  # As written before checksums existed.
  config_file.write_text(json.dumps(document))
  config, params = checkpoints.load_lm(copy / 'lm')
  assert config.vocab_size > 0 and params
  assert 'not verified' in caplog.text


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_training_falls_back_past_a_corrupt_checkpoint(copy, resumed_from_3, kind):
  """Step 6 corrupt: the run resumes from 3 and ends exactly as if step 6 had never been saved."""
  corrupt, message = CORRUPTIONS[kind]
  corrupt(_data_file(copy / 'checkpoints' / '6'))
  warnings = []
  lines = []
  _train(copy, train_steps=9, warn=warnings.append, log=lines.append)
  assert any('checkpoints/6 is corrupt' in w and 'corrupt/6' in w for w in warnings), warnings
  assert re.search(message, ' '.join(warnings))
  assert 'resumed from step 3 (3 batches consumed)' in lines
  assert (copy / 'corrupt' / '6').is_dir()  # Kept for inspection, out of orbax's way.
  jax.tree.map(np.testing.assert_array_equal, resumed_from_3,
               jax.tree.map(np.asarray, checkpoints.RunCheckpointer(copy).restore_params()))


def test_an_unsealed_checkpoint_is_not_trusted(copy):
  """A save killed after orbax finished but before its manifest: resume takes the older one."""
  (copy / 'checkpoints' / '6' / integrity.MANIFEST_FILE).unlink()
  warnings = []
  checkpointer = checkpoints.RunCheckpointer(copy)
  abstract = jax.tree.map(np.zeros_like, checkpointer.restore(3, _state_of(checkpointer, 3))[0])
  _, consumed, step = checkpointer.restore_latest(abstract, warn=warnings.append)
  assert (step, consumed) == (3, 3)
  assert 'manifest.json is missing' in warnings[0]


def _state_of(checkpointer, step):
  """An abstract state to restore into: checkpoint `step`'s own structure."""
  metadata = checkpoints.stored_tree(checkpointer.step_dir(step) / 'state')
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata,
                      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def test_no_intact_checkpoint_stops_training(copy):
  for step in ('3', '6'):
    _flip(_data_file(copy / 'checkpoints' / step))
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=r'No intact checkpoint .*steps \[6, 3\] were corrupt'):
    _train(copy, train_steps=9, warn=lambda _: None)


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_run_checkpoint_is_refused_by_eval(copy, kind):
  corrupt, message = CORRUPTIONS[kind]
  file = _data_file(copy / 'checkpoints' / '6')
  corrupt(file)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f'checkpoints/6 is corrupt: '
                           f'{_relative(file, copy / "checkpoints" / "6")} {message}'):
    checkpoints.RunCheckpointer(copy).restore_params()


def test_a_non_finite_checkpoint_is_refused(copy):
  """A NaN state written behind the guard's back (another tool): eval refuses it, training
  resumes from the one before."""
  checkpointer = checkpoints.RunCheckpointer(copy, max_to_keep=5)
  state, consumed = checkpointer.restore(6, _state_of(checkpointer, 6))
  poisoned = {**state, 'params': jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                              state['params'])}
  checkpointer.save(7, poisoned, consumed + 1)
  checkpointer.close()
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=r'checkpoints/7 holds non-finite values .*in'):
    checkpoints.RunCheckpointer(copy).restore_params()
  warnings = []
  _, _, step = checkpoints.RunCheckpointer(copy).restore_latest(state, warn=warnings.append)
  assert step == 6 and 'non-finite' in warnings[0]


def test_non_finite_lm_checkpoint_is_refused(copy, tmp_path):
  config, params = checkpoints.load_lm(copy / 'lm')
  params = jax.tree.map(np.asarray, params)
  leaf = jax.tree_util.tree_flatten_with_path(params)[0][0][0]
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: np.full_like(x, np.inf) if p == leaf else x, params)
  checkpoints.save_lm(tmp_path / 'nan_lm', config, params)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f'holds non-finite values .*{re.escape(jax.tree_util.keystr(leaf))}'):
    runs.load_checkpoint(tmp_path / 'nan_lm')


def test_calm_eval_on_a_corrupt_checkpoint_prints_one_line(copy):
  _flip(_data_file(copy / 'lm' / checkpoints.PARAMS_DIR))
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.eval', '--gin_file=runs/eval.gin',
       '--gin_file=tasks/kv_arithmetic.gin', f'--gin.CHECKPOINT="{copy / "lm"}"',
       "--gin.MIXTURE_OR_TASK_NAME='numeric_arithmetic'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 6, 'targets': 6}"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert 'CorruptCheckpointError' in last and 'lm is corrupt: params/' in last, last


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_composed_checkpoint_is_one_error(tmp_path, kind):
  from test_calm import init, make_config  # pylint: disable=g-import-not-at-top
  corrupt, message = CORRUPTIONS[kind]
  config = make_config(zero_init=False)
  path = tmp_path / 'composed'
  composed.save_composed(path, config, init(config))
  assert composed.load_composed(path).params  # Intact: loads.
  file = _data_file(path / composed.PARAMS_DIR)
  corrupt(file)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f'composed checkpoint .* is corrupt: {_relative(file, path)} '
                           f'{message}'):
    composed.load_composed(path)

