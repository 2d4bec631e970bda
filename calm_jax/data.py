"""Training and evaluation data through SeqIO, decoder-only features in T5X's layout.

Tasks with `inputs` and `targets` go through seqio's PrefixLMFeatureConverter (loss on targets
only, `decoder_causal_attention` marks the prompt); tasks with `targets` only through its
DecoderFeatureConverter. Packing is on request. Each process reads its own shard
(`seqio.ShardInfo(jax.process_index(), jax.process_count())`) and batches its share of the global
batch, ready for multi-host runs.

The data position of a run is the number of batches it has consumed: the pipeline is
deterministic given its seed, so a resumed run skips that many batches and sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf


class UnknownTaskError(ValueError):
  """No SeqIO task or mixture has the requested name."""


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture `name`, or an error listing what is registered."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise UnknownTaskError(
        f'Unknown task or mixture {name!r}. Registered: {", ".join(names) or "none"} '
        f'(is the module that registers it imported, e.g. calm_tasks.kv_arithmetic?)') from e


def tasks_of(name: str) -> list[seqio.Task]:
  """The tasks of the task or mixture `name` (a task alone is a list of one)."""
  task = get_task_or_mixture(name)
  return list(task.tasks) if isinstance(task, seqio.Mixture) else [task]


def is_aligned(task: seqio.Task | seqio.Mixture) -> bool:
  """Whether `task` yields an own-tokenizer augment's stream (`memory_tasks.aligned_features`).

  Raises:
    ValueError: a mixture of aligned and plain tasks.
  """
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  aligned = ['augment_input_tokens' in t.output_features for t in tasks]
  if any(aligned) and not all(aligned):
    raise ValueError(f'{task.name} mixes tasks with and without an augment stream.')
  return all(aligned)


class _AlignedFeatureConverter(seqio.PrefixLMFeatureConverter):
  """The prefix-LM converter with the augment stream passed through, completing the lengths
  (`aligned_lengths`) from 'inputs' and 'targets': seqio's Evaluator keeps only the lengths of
  the task's own features.

  Packed, seqio's packer packs every feature together (an example joins a row only if both
  streams fit), so example k of a row is segment k of both streams; the augment's segments
  and positions are the packer's of 'augment_input_tokens' ('augment_positions' is added).
  Read keys restart at 0 in each example: the cross mask compares them within a segment only.
  seqio refuses pass-through features when packing because its packer takes a 0 for padding
  and cuts each feature at its count of non-zeros; the stream features hold real zeros (the
  shifted-in input, key 0, the prompt mask's 0s), so they are packed shifted up by one and
  shifted back after (the test of packed rows against the examples alone guards this).
  """

  PACKING_FEATURE_DTYPES = {**seqio.PrefixLMFeatureConverter.PACKING_FEATURE_DTYPES,
                            'augment_segment_ids': tf.int32, 'augment_positions': tf.int32}

  def __init__(self, pack: bool, **kwargs):
    passthrough = dict(kwargs.pop('passthrough_features'))
    if pack:  # Made by the packer (whose own outputs are named '*_segment_ids').
      passthrough.pop('augment_segment_ids')
    super().__init__(pack=False, passthrough_features=passthrough, **kwargs)
    self._pack = bool(pack)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
               ) -> tf.data.Dataset:
    lengths = aligned_lengths(task_feature_lengths)
    if self.pack:
      lengths.pop('augment_segment_ids')
    return super().__call__(ds, lengths)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    if self.pack:
      names = list(self._passthrough_features)
      ds = ds.map(lambda ex: {**ex, **{k: ex[k] + 1 for k in names}},
                  num_parallel_calls=tf.data.AUTOTUNE)
    return super()._convert_features(ds, task_feature_lengths)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    d = dict(super()._convert_example(features))
    if self.pack:
      augment = features['augment_input_tokens_segment_ids']
      for k in self._passthrough_features:
        segments = features['targets_segment_ids'] if k == 'decoder_read_keys' else augment
        d[k] = tf.where(segments > 0, features[k] - 1, tf.zeros_like(features[k]))
      d['augment_segment_ids'] = augment
      d['augment_positions'] = features['augment_input_tokens_positions']
    return d

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    if self.pack:
      lengths['augment_segment_ids'] = lengths['augment_input_tokens']
      lengths['augment_positions'] = lengths['augment_input_tokens']
    return lengths


def feature_converter(task: seqio.Task | seqio.Mixture, pack: bool) -> seqio.FeatureConverter:
  """Prefix-LM converter for input/target tasks, plain LM converter for target-only ones; for
  tasks with an augment stream the prefix-LM converter passes `alignment.STREAM_FEATURES`
  through, packed (with 'augment_positions') or padded.
  """
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  if is_aligned(task):
    from calm_jax import alignment  # pylint: disable=g-import-not-at-top
    spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
    return _AlignedFeatureConverter(
        pack=pack, loss_on_targets_only=True,
        passthrough_features={name: spec for name in alignment.STREAM_FEATURES})
  if all('inputs' in t.output_features for t in tasks):
    return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
  return seqio.DecoderFeatureConverter(pack=pack)


def task_feature_names(name: str) -> tuple[str, ...]:
  """The features TASK_FEATURE_LENGTHS of `name` must give lengths for, sorted.

  They are the task features of `name`'s feature converter (`feature_converter`), which seqio
  requires to match the lengths' keys exactly: ('inputs', 'targets') for input/target tasks,
  ('targets',) for target-only ones.

  Args:
    name: a registered task or mixture.
  """
  converter = feature_converter(get_task_or_mixture(name), pack=False)
  return tuple(sorted(converter.TASK_FEATURES))


def aligned_lengths(task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
  """{'inputs', 'targets'} (and optionally 'augment_input_tokens', default their sum) as the
  lengths of every feature of a task with an augment stream."""
  from calm_jax import alignment  # pylint: disable=g-import-not-at-top
  total = int(task_feature_lengths['inputs']) + int(task_feature_lengths['targets'])
  augment = int(task_feature_lengths.get('augment_input_tokens') or total)
  lengths = {'inputs': int(task_feature_lengths['inputs']),
             'targets': int(task_feature_lengths['targets']), 'decoder_read_keys': total}
  lengths.update({name: augment for name in alignment.STREAM_FEATURES[1:]})
  return lengths


def get_dataset(name: str, task_feature_lengths: Mapping[str, int], split: str,
                batch_size: int, *, shuffle: bool = True, seed: int = 0, pack: bool = False,
                num_epochs: int | None = None, skip_batches: int = 0) -> tf.data.Dataset:
  """This process's batches of `name`, as model features.

  Args:
    name: a registered task or mixture.
    task_feature_lengths: e.g. {'inputs': 16, 'targets': 8} (T5X's TASK_FEATURE_LENGTHS).
    split: dataset split.
    batch_size: the global batch size; each process batches batch_size / process_count.
    shuffle: shuffle examples (seeded).
    seed: the pipeline's seed; the same seed gives the same batches.
    pack: pack several examples per row (segment ids and positions then come with it).
    num_epochs: None repeats forever.
    skip_batches: batches already consumed (resume).

  Raises:
    validation.ConfigError: `batch_size` does not divide among the processes.
  """
  # validation imports this module: imported here, not at the top, to keep the import acyclic.
  from calm_jax import validation  # pylint: disable=g-import-not-at-top
  task = get_task_or_mixture(name)
  processes = jax.process_count()
  validation.check_batch_per_process(batch_size, processes)
  task_feature_lengths = dict(task_feature_lengths)
  if is_aligned(task):
    task_feature_lengths = aligned_lengths(task_feature_lengths)
  shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=processes)
  if is_aligned(task) and isinstance(task, seqio.Mixture):
    # A mixture keeps only its output features unless told otherwise: keep the stream's.
    from calm_jax import alignment  # pylint: disable=g-import-not-at-top
    ds = task.get_dataset(task_feature_lengths, split=split, use_cached=False,
                          shuffle=shuffle, seed=seed, shard_info=shard_info,
                          num_epochs=num_epochs,
                          passthrough_features=list(alignment.STREAM_FEATURES))
    ds = feature_converter(task, pack)(ds, task_feature_lengths=task_feature_lengths)
  else:
    ds = seqio.get_dataset(
        name, task_feature_lengths=task_feature_lengths, dataset_split=split,
        shuffle=shuffle, num_epochs=num_epochs, seed=seed, use_cached=False,
        shard_info=shard_info, feature_converter=feature_converter(task, pack))
  ds = ds.batch(batch_size // processes, drop_remainder=True)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.prefetch(tf.data.AUTOTUNE)


def as_numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates `ds` as dicts of numpy arrays."""
  for batch in ds.as_numpy_iterator():
    yield {k: np.asarray(v) for k, v in batch.items()}
