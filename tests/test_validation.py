"""Start-up validation of a run's configuration, on the registered key-value tasks.

Each observed failure has a test that the validation replaces it by one ConfigError (or, for
truncation, one warning line). The batch checks need several devices: they run in a
subprocess with 8 emulated CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
import seqio
import tensorflow as tf

from calm_jax import data, partitioning, validation
from calm_jax.validation import ConfigError
from calm_tasks import kv_arithmetic, kv_data

TASK = 'kv_substitution'  # 500 validation examples: inputs and targets of 4 or 6 tokens.
MIXTURE = 'kv_arithmetic_eval'  # Three tasks.
TARGETS_ONLY = 'validation_test_targets_only'
VOCAB = 517  # The key-value tasks' vocabulary size.
LENGTHS = {'inputs': 8, 'targets': 8}


@pytest.fixture(scope='module', autouse=True)
def targets_only_task():
  """A registered target-only task (the plain LM feature converter's case)."""
  vocab = kv_arithmetic.vocabulary(kv_data.KVSpec())
  texts = ['1 + 2', '3', '4 - 5 + 6 - 7']

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({'targets': texts})

  seqio.TaskRegistry.add(
      TARGETS_ONLY, source=seqio.FunctionDataSource(dataset_fn, splits=('train',)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={'targets': seqio.Feature(vocab, add_eos=True)})
  yield
  seqio.TaskRegistry.remove(TARGETS_ONLY)


def _validate(**overrides):
  """validate_run on one device with valid settings, except `overrides`; returns the log."""
  lines = []
  kwargs = dict(mode='compose', mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                batch_size=4, split='validation',
                mesh=partitioning.make_mesh(partitioning.MeshConfig(), jax.devices()[:1]),
                rules=partitioning.STANDARD_RULES, model_vocab_size=VOCAB, log=lines.append,
                max_examples=100)
  kwargs.update(overrides)
  validation.validate_run(**kwargs)
  return lines


def test_valid_run_passes_silently():
  assert not _validate()
  assert not _validate(mixture_or_task_name=MIXTURE, model_vocab_size=VOCAB + 40)


def test_unknown_task_is_named():
  with pytest.raises(data.UnknownTaskError, match="Unknown task or mixture 'kv_nope'"):
    _validate(mixture_or_task_name='kv_nope')


# 2. TASK_FEATURE_LENGTHS.


def test_feature_lengths_as_a_list_replaces_the_type_error():
  with pytest.raises(ConfigError) as error:
    _validate(task_feature_lengths=[6, 6])
  assert str(error.value) == ("TASK_FEATURE_LENGTHS must be a dict like {'inputs': 16, "
                              "'targets': 8} for task kv_substitution; got [6, 6]")


@pytest.mark.parametrize('lengths, detail', [
    ({'targets': 8}, "missing ['inputs']"),
    ({'inputs': 8, 'targets': 8, 'extra': 4}, "unexpected ['extra']"),
    ({'input': 8, 'targets': 8}, "missing ['inputs']; unexpected ['input']"),
    ({'inputs': 0, 'targets': 8}, "lengths must be positive ints, not {'inputs': 0}"),
    ({'inputs': 8, 'targets': '8'}, "lengths must be positive ints, not {'targets': '8'}"),
    ({'inputs': 8, 'targets': 2.5}, "lengths must be positive ints, not {'targets': 2.5}"),
    ({'inputs': True, 'targets': 8}, "lengths must be positive ints, not {'inputs': True}"),
])
def test_feature_lengths_with_wrong_keys_or_values(lengths, detail):
  with pytest.raises(ConfigError, match='TASK_FEATURE_LENGTHS must be a dict like') as error:
    validation.check_feature_lengths(TASK, lengths)
  assert f'got {lengths!r} ({detail})' in str(error.value)


def test_feature_lengths_follow_the_feature_converter():
  assert data.task_feature_names(TASK) == ('inputs', 'targets')
  assert data.task_feature_names(TARGETS_ONLY) == ('targets',)
  validation.check_feature_lengths(TARGETS_ONLY, {'targets': 8})
  with pytest.raises(ConfigError, match=r"dict like \{'targets': 8\} for task "
                                        f"{TARGETS_ONLY}; got .*unexpected \\['inputs'\\]"):
    validation.check_feature_lengths(TARGETS_ONLY, LENGTHS)
  with pytest.raises(ConfigError, match=f"for mixture {MIXTURE}; got {{'targets': 8}}"):
    validation.check_feature_lengths(MIXTURE, {'targets': 8})


# 1. Vocabulary.


@pytest.mark.parametrize('mode, what', [('compose', 'anchor'), ('finetune', 'anchor'),
                                        ('pretrain', 'model')])
def test_small_vocabulary_replaces_the_nan_loss(mode, what):
  with pytest.raises(ConfigError) as error:
    _validate(mode=mode, model_vocab_size=100)
  message = str(error.value)
  assert message.startswith(f'The {what} vocabulary (100 tokens) is smaller than the vocabulary '
                            f'of task {TASK} ({VOCAB} tokens, feature ')
  assert f'vocab_size >= {VOCAB}' in message


def test_vocabulary_of_a_mixture_and_of_the_augments():
  validation.check_vocabulary(VOCAB, MIXTURE, 'anchor')
  with pytest.raises(ConfigError, match=f'of mixture {MIXTURE} \\({VOCAB} tokens'):
    validation.check_vocabulary(VOCAB - 1, MIXTURE, 'anchor')
  with pytest.raises(ConfigError, match="The augment 'm_a' vocabulary \\(50 tokens\\)"):
    _validate(augment_vocab_sizes={'m_a': 50})
  assert not _validate(model_vocab_size=None)  # Skipped.


# 3. BATCH_SIZE (one device here; several in the subprocess below).


@pytest.mark.parametrize('batch_size', [0, -4, 2.0, '4', None])
def test_batch_size_must_be_a_positive_int(batch_size):
  with pytest.raises(ConfigError, match='BATCH_SIZE must be a positive int; got '):
    _validate(batch_size=batch_size)


def test_per_process_check_has_one_home_used_by_get_dataset(monkeypatch):
  with pytest.raises(ConfigError, match='BATCH_SIZE 7 is not divisible by the 2 processes.*'
                                        'nearest valid sizes: 6 or 8'):
    validation.check_batch_per_process(7, 2)
  validation.check_batch_per_process(8, 2)
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(ConfigError, match='BATCH_SIZE 6 is not divisible by the 4 processes'):
    data.get_dataset(TASK, LENGTHS, 'validation', 6)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import calm_tasks.kv_arithmetic
    from calm_jax import partitioning, validation
    from calm_jax.partitioning import MeshConfig, make_mesh

    def error(fn, *args, **kwargs):
      try:
        fn(*args, **kwargs)
      except validation.ConfigError as e:
        return str(e)
      return None

    meshes = {
        'data2': (make_mesh(MeshConfig(), jax.devices()[:2]), partitioning.STANDARD_RULES),
        'data4_model2': (make_mesh(MeshConfig(model=2)), partitioning.STANDARD_RULES),
        'replica2_data2_model2_fsdp': (make_mesh(MeshConfig(replica=2, model=2, fsdp=True)),
                                       partitioning.FSDP_RULES),
        'model8': (make_mesh(MeshConfig(model=8)), partitioning.STANDARD_RULES),
    }
    report = {'ways': {}, 'errors': {}}
    for name, (mesh, rules) in meshes.items():
      report['ways'][name] = validation.data_parallel_size(mesh, rules)
      for batch_size in (1, 3, 4, 6, 7, 8, 12):
        report['errors'][f'{name}/{batch_size}'] = error(
            validation.check_batch_size, batch_size, mesh, rules)
    mesh, rules = meshes['data2']
    report['validate_run'] = error(
        validation.validate_run, mode='compose', mixture_or_task_name='kv_substitution',
        task_feature_lengths={'inputs': 8, 'targets': 8}, batch_size=7, split='validation',
        mesh=mesh, rules=rules, model_vocab_size=517, log=print, max_examples=10)
    print(json.dumps(report))
""")


@pytest.fixture(scope='module')
def multi_device_report(repo_root):
  """The batch checks on meshes of 8 emulated CPU devices (a fresh process sets the count)."""
  env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', _MULTI_DEVICE_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_batch_not_divisible_by_the_mesh_replaces_the_indivisible_error(multi_device_report):
  assert multi_device_report['validate_run'] == (
      "BATCH_SIZE 7 is not divisible by the data-parallel size 2: the batch is split over the "
      "mesh axes ('replica', 'data') of the mesh {'replica': 1, 'data': 2, 'model': 1}; "
      "nearest valid sizes: 6 or 8.")


def test_data_parallel_size_and_nearest_valid_batch_sizes(multi_device_report):
  assert multi_device_report['ways'] == {'data2': 2, 'data4_model2': 4,
                                         'replica2_data2_model2_fsdp': 4, 'model8': 1}
  errors = multi_device_report['errors']
  for name, ways in multi_device_report['ways'].items():
    for batch_size in (1, 3, 4, 6, 7, 8, 12):
      message = errors[f'{name}/{batch_size}']
      assert (message is None) == (batch_size % ways == 0), (name, batch_size, message)
  assert errors['data4_model2/6'].endswith(
      "mesh {'replica': 1, 'data': 4, 'model': 2}; nearest valid sizes: 4 or 8.")
  assert errors['replica2_data2_model2_fsdp/3'].endswith('nearest valid sizes: 4.')
  assert 'data-parallel size 4' in errors['replica2_data2_model2_fsdp/7']


# 4. Truncation.


def _seqio_truncated(task, lengths, num_examples, split='validation'):
  """{feature: examples seqio's own trimming shortens} of the first `num_examples`."""
  task = seqio.get_mixture_or_task(task)
  full = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  trimmed = task.get_dataset(sequence_length=lengths, split=split, shuffle=False)
  counts = dict.fromkeys(lengths, 0)
  for a, b in zip(full.take(num_examples).as_numpy_iterator(),
                  trimmed.take(num_examples).as_numpy_iterator()):
    for feature in lengths:
      counts[feature] += int(len(b[feature]) < len(a[feature]))
  return counts


@pytest.mark.parametrize('lengths', [
    {'inputs': 8, 'targets': 8},
    {'inputs': 6, 'targets': 6},  # The longest examples fit exactly, EOS included.
    {'inputs': 5, 'targets': 5},  # Their EOS is cut.
    {'inputs': 3, 'targets': 4},
])
def test_count_truncated_equals_what_seqio_cuts(lengths):
  counts = validation.count_truncated(TASK, lengths, 'validation', max_examples=200)
  assert {k: n for k, (n, _) in counts.items()} == _seqio_truncated(TASK, lengths, 200)
  assert {k: checked for k, (_, checked) in counts.items()} == {'inputs': 200, 'targets': 200}


def test_count_truncated_counts_eos_and_reads_at_most_max_examples():
  assert validation.count_truncated(TASK, {'inputs': 6, 'targets': 6}, 'validation') == {
      'inputs': (0, 500), 'targets': (0, 500)}
  longer, checked = validation.count_truncated(TASK, {'inputs': 6, 'targets': 5}, 'validation',
                                               max_examples=100)['targets']
  assert checked == 100 and 0 < longer < 100
  # A mixture: each of its three tasks is read.
  mixture = validation.count_truncated(MIXTURE, LENGTHS, 'validation', max_examples=20)
  assert mixture['targets'][1] == 60


def test_report_truncation_logs_one_line_only_when_something_is_cut():
  lines = []
  validation.report_truncation({'inputs': (0, 1000), 'targets': (523, 1000)}, lines.append,
                               task_feature_lengths={'inputs': 16, 'targets': 8})
  assert lines == ['targets: 523 of 1000 examples checked are longer than 8 tokens '
                   'and will be truncated (TASK_FEATURE_LENGTHS)']
  lines.clear()
  validation.report_truncation({'inputs': (0, 1000), 'targets': (0, 1000)}, lines.append,
                               task_feature_lengths={'inputs': 16, 'targets': 8})
  assert not lines


def test_short_lengths_no_longer_truncate_silently():
  lines = _validate(task_feature_lengths={'inputs': 8, 'targets': 5})
  assert len(lines) == 1
  assert lines[0].startswith(f'task {TASK}: targets: ')
  assert lines[0].endswith(' of 100 examples checked are longer than 5 tokens and will be '
                           'truncated (TASK_FEATURE_LENGTHS)')
  assert len(_validate(mixture_or_task_name=MIXTURE,
                       task_feature_lengths={'inputs': 3, 'targets': 8})) == 3


def test_unknown_split_is_named():
  with pytest.raises(ConfigError, match="Split 'trian' is not a split of task kv_substitution "
                                        r'\(it has train, validation\)'):
    _validate(split='trian')
