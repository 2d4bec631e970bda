"""Start-up checks of a training run's configuration, before any model is built.

A mistake in MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, BATCH_SIZE or the choice of model
otherwise shows up late and far from its cause: a vocabulary smaller than the task's as a NaN
loss at step 1 (the embedding lookup of an id past the table fills NaN), lengths given as a list
as a TypeError inside seqio, a batch that does not divide over the mesh as JAX's
IndivisibleError, and lengths shorter than the data not at all (seqio truncates silently).
`validate_run` runs every check in turn and raises one `ConfigError` naming the setting to
change; truncation is only logged, since a run may truncate on purpose.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import seqio

from calm_jax import data, partitioning

# Lengths shown in the example of the expected TASK_FEATURE_LENGTHS.
_EXAMPLE_LENGTHS = {'inputs': 16, 'targets': 8}


class ConfigError(ValueError):
  """A run's configuration cannot work; the message names the setting to change."""


def _kind(name: str) -> str:
  """'task NAME' or 'mixture NAME'."""
  task = data.get_task_or_mixture(name)
  return f'{"mixture" if isinstance(task, seqio.Mixture) else "task"} {name}'


def _is_positive_int(value: Any) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and int(value) > 0)


def _nearest_multiples(value: int, step: int) -> list[int]:
  """The multiples of `step` just below and above `value` (positive ones only)."""
  below = value // step * step
  return [below, below + step] if below > 0 else [below + step]


def check_feature_lengths(task_name: str, task_feature_lengths: Any) -> None:
  """Checks TASK_FEATURE_LENGTHS: {feature: positive int} over exactly the task's features.

  Args:
    task_name: a registered task or mixture.
    task_feature_lengths: the run's TASK_FEATURE_LENGTHS, e.g. {'inputs': 16, 'targets': 8}.

  Raises:
    ConfigError: it is not a mapping, its keys are not `data.task_feature_names(task_name)`, or
      a length is not a positive int.
  """
  names = data.task_feature_names(task_name)
  example = {n: _EXAMPLE_LENGTHS.get(n, 8) for n in names}
  problem = ''
  if not isinstance(task_feature_lengths, Mapping):
    pass  # The expected form says it all.
  elif set(task_feature_lengths) != set(names):
    missing = sorted(set(names) - set(task_feature_lengths))
    unexpected = sorted(set(task_feature_lengths) - set(names), key=str)
    problem = '; '.join(
        ([f'missing {missing}'] if missing else []) +
        ([f'unexpected {unexpected}'] if unexpected else []))
  else:
    bad = {k: v for k, v in task_feature_lengths.items() if not _is_positive_int(v)}
    if not bad:
      return
    problem = f'lengths must be positive ints, not {bad}'
  raise ConfigError(
      f'TASK_FEATURE_LENGTHS must be a dict like {example} for {_kind(task_name)}; got '
      f'{task_feature_lengths!r}' + (f' ({problem})' if problem else ''))


def check_vocabulary(model_vocab_size: int, task_name: str, what: str,
                     features: Sequence[str] | None = None) -> None:
  """Checks that a model's vocabulary covers every token id of the task's features.

  A larger model vocabulary is fine (padded vocabularies are common); a smaller one makes the
  embedding lookup of the task's higher ids fill NaN.

  Args:
    model_vocab_size: the model's `vocab_size`.
    task_name: a registered task or mixture.
    what: the model, as the message names it: 'model', 'anchor', "augment 'm_a'".
    features: the output features the model reads (default: all but an own-tokenizer
      augment's stream, 'augment_input_tokens').

  Raises:
    ConfigError: some output feature vocabulary of some task of `task_name` is larger.
  """
  larger = []
  for task in data.tasks_of(task_name):
    for feature, spec in task.output_features.items():
      if (feature not in features) if features is not None else (
          feature == 'augment_input_tokens'):
        continue
      size = spec.vocabulary.vocab_size
      if size > model_vocab_size:
        larger.append((size, task.name, feature))
  if not larger:
    return
  size, task, feature = max(larger)
  where = f'task {task}' if task == task_name else f'task {task} of {_kind(task_name)}'
  raise ConfigError(
      f'The {what} vocabulary ({model_vocab_size} tokens) is smaller than the vocabulary of '
      f'{where} ({size} tokens, feature {feature!r}): ids {model_vocab_size} and up would index '
      f'past the {what} embedding and make the loss NaN. Use a {what} with vocab_size >= {size} '
      f'or a task in its vocabulary.')


def data_parallel_size(mesh: jax.sharding.Mesh, rules: partitioning.Rules) -> int:
  """How many ways `partitioning.batch_sharding` splits the batch dimension over `mesh`."""
  axes = partitioning.batch_sharding(mesh, rules).spec[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_per_process(batch_size: int, process_count: int | None = None) -> None:
  """Checks that BATCH_SIZE divides among the processes (each reads its own share).

  Args:
    batch_size: the global batch size.
    process_count: default `jax.process_count()`.

  Raises:
    ConfigError: it does not.
  """
  processes = jax.process_count() if process_count is None else process_count
  if batch_size % processes:
    raise ConfigError(
        f'BATCH_SIZE {batch_size} is not divisible by the {processes} processes (each reads '
        f'BATCH_SIZE / {processes} rows); nearest valid sizes: '
        f'{" or ".join(map(str, _nearest_multiples(batch_size, processes)))}.')


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh,
                     rules: partitioning.Rules) -> None:
  """Checks that BATCH_SIZE splits evenly over the batch's mesh axes and over the processes.

  Args:
    batch_size: the global batch size (BATCH_SIZE).
    mesh: the run's mesh.
    rules: its logical axis rules (the `batch` rule says which mesh axes split the batch).

  Raises:
    ConfigError: it is not a positive int or does not divide.
  """
  if not _is_positive_int(batch_size):
    raise ConfigError(f'BATCH_SIZE must be a positive int; got {batch_size!r}.')
  ways = data_parallel_size(mesh, rules)
  if batch_size % ways:
    step = math.lcm(ways, jax.process_count())
    axes = partitioning.batch_sharding(mesh, rules).spec[0]
    raise ConfigError(
        f'BATCH_SIZE {batch_size} is not divisible by the data-parallel size {ways}: the batch '
        f'is split over the mesh axes {axes} of the mesh {dict(mesh.shape)}; nearest valid '
        f'sizes: {" or ".join(map(str, _nearest_multiples(batch_size, step)))}.')
  check_batch_per_process(batch_size)


def check_split(task_name: str, split: str) -> None:
  """Checks that every task of `task_name` has `split` (tasks that list no splits pass).

  Args:
    task_name: a registered task or mixture.
    split: the split the run reads.

  Raises:
    ConfigError: a task lists its splits and `split` is not one of them.
  """
  for task in data.tasks_of(task_name):
    splits = tuple(task.splits or ())
    if splits and split not in splits:
      raise ConfigError(f'Split {split!r} is not a split of task {task.name} '
                        f'(it has {", ".join(splits)}).')


def count_truncated(task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                    max_examples: int = 1000) -> dict[str, tuple[int, int]]:
  """Counts the examples whose features are longer than their lengths (seqio truncates them).

  Reads the first `max_examples` examples of each task of `task_name` preprocessed without
  trimming (`sequence_length=None`). seqio's trimming (`Task._trim_output_features`, after all
  preprocessors) keeps the first `length` tokens of each feature; an EOS is already in the
  preprocessed feature when the feature has `add_eos` (`append_eos`, `tokenize_and_append_eos`
  and, without a sequence length, `append_eos_after_trim` all append it), so a feature is cut
  exactly when it is longer than its length, EOS included.

  Args:
    task_name: a registered task or mixture (its tasks' counts are summed).
    task_feature_lengths: {feature: length} (TASK_FEATURE_LENGTHS).
    split: the split the run reads.
    max_examples: examples read per task.

  Returns:
    {feature: (examples longer than its length, examples checked)}.
  """
  counts = {feature: [0, 0] for feature in task_feature_lengths}
  for task in data.tasks_of(task_name):
    found = _count_task(task, tuple(sorted(dict(task_feature_lengths).items())), split,
                        max_examples)
    for feature, (longer, checked) in found.items():
      counts[feature][0] += longer
      counts[feature][1] += checked
  return {feature: (longer, checked) for feature, (longer, checked) in counts.items()}


# Per task object (a re-registered task is a new one): a process that starts several runs of
# one task (a notebook, the key-value experiment) reads its examples once.
@functools.lru_cache(maxsize=64)
def _count_task(task: seqio.Task, lengths: tuple[tuple[str, int], ...], split: str,
                max_examples: int) -> dict[str, tuple[int, int]]:
  counts = {feature: [0, 0] for feature, _ in lengths}
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                        use_cached=False, trim_output_features=False)
  for example in ds.take(max_examples).as_numpy_iterator():
    for feature, length in lengths:
      if feature in example:
        counts[feature][1] += 1
        counts[feature][0] += int(np.shape(example[feature])[0] > length)
  return {feature: (longer, checked) for feature, (longer, checked) in counts.items()}


def report_truncation(counts: Mapping[str, tuple[int, int]], log: Callable[[str], None], *,
                      task_feature_lengths: Mapping[str, int],
                      task_name: str | None = None) -> None:
  """Logs one warning line if `count_truncated` found examples that will be truncated.

  Args:
    counts: `count_truncated`'s result.
    log: the warning sink (e.g. `logging.warning`).
    task_feature_lengths: the lengths `counts` was measured against.
    task_name: named in the line when given.
  """
  parts = [f'{feature}: {longer} of {checked} examples checked are longer than '
           f'{task_feature_lengths[feature]} tokens and will be truncated'
           for feature, (longer, checked) in counts.items() if longer]
  if parts:
    where = f'task {task_name}: ' if task_name else ''
    log(f'{where}{"; ".join(parts)} (TASK_FEATURE_LENGTHS)')


def validate_run(*, mode: str, mixture_or_task_name: str, task_feature_lengths: Any,
                 batch_size: Any, split: str, mesh: jax.sharding.Mesh,
                 rules: partitioning.Rules, model_vocab_size: int | None,
                 log: Callable[[str], None],
                 augment_vocab_sizes: Mapping[str, int] | None = None,
                 own_tokenizer: Sequence[str] = (),
                 max_examples: int = 1000) -> None:
  """Checks a training run's configuration before any model is built (`train.train`).

  In order: the task exists, TASK_FEATURE_LENGTHS, the vocabularies, BATCH_SIZE over the mesh
  and processes, the split; then logs a warning per task whose data the lengths truncate.

  Args:
    mode: 'pretrain' (the vocabulary checked is the model's) or 'compose' / 'finetune' (the
      anchor's).
    mixture_or_task_name: MIXTURE_OR_TASK_NAME.
    task_feature_lengths: TASK_FEATURE_LENGTHS.
    batch_size: BATCH_SIZE (global).
    split: the dataset split the run reads.
    mesh: the run's mesh.
    rules: its logical axis rules.
    model_vocab_size: the trained model's (pretrain) or anchor's vocab_size; None skips the
      check.
    log: the warning sink of the truncation lines (train: its `warn`).
    augment_vocab_sizes: compose: {augment name: vocab_size}, checked like the anchor's (the
      augments read the same tokens, an augment of `own_tokenizer` its own stream).
    own_tokenizer: compose: the augments that read their own tokenization.
    max_examples: examples read per task for the truncation count.

  Raises:
    data.UnknownTaskError: no task or mixture has the name.
    ConfigError: any other check fails.
  """
  data.get_task_or_mixture(mixture_or_task_name)
  check_feature_lengths(mixture_or_task_name, task_feature_lengths)
  if model_vocab_size is not None:
    check_vocabulary(model_vocab_size, mixture_or_task_name,
                     'model' if mode == 'pretrain' else 'anchor')
  for name, size in (augment_vocab_sizes or {}).items():
    check_vocabulary(size, mixture_or_task_name, f'augment {name!r}',
                     ('augment_input_tokens',) if name in own_tokenizer else None)
  check_batch_size(batch_size, mesh, rules)
  check_split(mixture_or_task_name, split)
  for task in data.tasks_of(mixture_or_task_name):
    counts = count_truncated(task.name, task_feature_lengths, split, max_examples)
    report_truncation(counts, log, task_feature_lengths=task_feature_lengths,
                      task_name=task.name)
