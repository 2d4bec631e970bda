"""SeqIO tasks over examples held in memory (the Bible and code domains build theirs so).

Each `(inputs, targets)` task tokenizes both features with one vocabulary, puts the
vocabulary's BOS first where its models read one (Gemma; `prepend_bos`) and EOS after the
targets. Registering a name that exists replaces it, so a gin file or an experiment can
register again with other settings.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from calm_jax import vocab as vocab_lib


def replace_task(name: str, **kwargs) -> None:
  """seqio.TaskRegistry.add, replacing a task of that name."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, **kwargs)


def replace_mixture(name: str, rates: dict[str, float]) -> None:
  """seqio.MixtureRegistry.add of {task: rate}, replacing a mixture of that name."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(rates.items()))


def memory_source(examples: Callable[[str], Sequence[dict[str, str]]],
                  splits: Sequence[str] = ('train', 'validation')) -> seqio.DataSource:
  """A data source of `examples(split)` (dicts of strings, one key set) for each split."""
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # In memory; seqio shuffles examples itself.
    rows = examples(split)
    return tf.data.Dataset.from_tensor_slices(
        {key: [row[key] for row in rows] for key in rows[0]})
  return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def prepend_bos(dataset: tf.data.Dataset, bos_id: int) -> tf.data.Dataset:
  """Puts `bos_id` before every tokenized 'inputs' (an LM row's empty inputs become [BOS]), so
  that a pretrained model that reads BOS first (Gemma) sees every row as it was trained."""
  def add(example):
    return {**example, 'inputs': tf.concat(
        [tf.constant([bos_id], example['inputs'].dtype), example['inputs']], 0)}
  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def keep_inputs_end(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                    reserve: int = 0) -> tf.data.Dataset:
  """Trims each tokenized 'inputs' to its last `sequence_length['inputs'] - reserve` tokens
  (seqio trims the end; a prompt's end, its cue "Summary:", must survive)."""
  if not sequence_length or sequence_length.get('inputs') is None:
    return dataset
  keep = int(sequence_length['inputs']) - reserve
  return dataset.map(lambda ex: {**ex, 'inputs': ex['inputs'][-keep:]},
                     num_parallel_calls=tf.data.AUTOTUNE)


def seq2seq_task(name: str, vocabulary: seqio.Vocabulary,
                 rows: Callable[[str], Sequence[dict[str, str]]],
                 metric_fns: Sequence[Callable],
                 postprocess_fn: Callable | None = None,
                 splits: Sequence[str] = ('train', 'validation'),
                 keep_prompt_end: bool = False) -> None:
  """Registers an (inputs, targets) task over `rows(split)` (module docstring); rows may carry
  further string fields, which the postprocessor sees in its `example`. `keep_prompt_end`:
  inputs longer than their feature length lose their beginning, not their end."""
  preprocessors = [seqio.preprocessors.tokenize]
  bos = vocab_lib.model_bos_id(vocabulary)
  if keep_prompt_end:
    preprocessors.append(functools.partial(keep_inputs_end, reserve=int(bos is not None)))
  if bos is not None:  # A pretrained model's vocabulary (Gemma's): its models read BOS first.
    preprocessors.append(functools.partial(prepend_bos, bos_id=bos))
  replace_task(
      name, source=memory_source(rows, splits),
      preprocessors=preprocessors + [seqio.preprocessors.append_eos],
      output_features={'inputs': seqio.Feature(vocabulary, add_eos=False),
                       'targets': seqio.Feature(vocabulary, add_eos=True)},
      postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))


def lm_task(name: str, vocabulary: seqio.Vocabulary,
            texts: Callable[[str], Sequence[str]]) -> None:
  """Registers language modelling over `texts(split)` in the (inputs, targets) form, inputs
  empty, so that it mixes with the seq2seq tasks (seqio mixes tasks of one feature set)."""
  seq2seq_task(name, vocabulary, lambda split: [{'inputs': '', 'targets': t}
                                                for t in texts(split)], [])


def aligned_features(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None, *,
                     anchor_vocabulary: seqio.Vocabulary, augment_vocabulary: seqio.Vocabulary
                     ) -> tf.data.Dataset:
  """Adds the augment's own tokenization and both streams' read keys to tokenized examples.

  Runs after tokenization (and BOS / EOS): trims 'inputs' and 'targets' to their lengths as
  seqio would, then, from the texts seqio keeps ('inputs_pretokenized', ...), adds
  `alignment.STREAM_FEATURES` in the form seqio's prefix-LM converter passes through:
  'decoder_read_keys' over the anchor's inputs + targets, the augment's decoder inputs,
  read keys, segments and prompt region (at most sequence_length['augment_input_tokens']).
  """
  from calm_jax import alignment  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  lengths = dict(sequence_length or {})
  in_len, tg_len = lengths.get('inputs'), lengths.get('targets')
  augment_len = lengths.get('augment_input_tokens')
  anchor_bos = vocab_lib.model_bos_id(anchor_vocabulary)
  augment_bos = vocab_lib.model_bos_id(augment_vocabulary)

  def kept_ends(text, kept):
    """Byte ends of the tokens seqio kept of `text` (its first or its last ones)."""
    ids, ends = alignment.token_ends(anchor_vocabulary, text)
    k = len(kept)
    if list(ids[:k]) == list(kept):
      return ends[:k]
    if k and list(ids[-k:]) == list(kept):
      return ends[-k:]
    raise alignment.AlignmentError(f'the tokens of {text[:40]!r} are not its tokenization.')

  def compute(inputs, targets, inputs_text, targets_text):
    inputs_text, targets_text = inputs_text.decode('utf-8'), targets_text.decode('utf-8')
    head = 0 if anchor_bos is None else 1
    offset = len(inputs_text.encode('utf-8'))
    in_ends = kept_ends(inputs_text, inputs[head:])
    tg_ends = kept_ends(targets_text, targets[:-1]) + offset  # The last target is EOS.
    eos_end = tg_ends[-1] if len(tg_ends) else offset
    ends = np.concatenate([[0] * head, in_ends, tg_ends, [eos_end]]).astype(np.int64)
    keys = alignment.decoder_read_keys(alignment.read_keys(ends))
    size = augment_len or 4 * len(ends) + 8
    m = alignment.prefix_lm_features(
        anchor_vocabulary, augment_vocabulary, inputs_text, targets_text, length=len(ends),
        augment_length=size, augment_bos=augment_bos, anchor_bos=anchor_bos)
    n = int(m['augment_segment_ids'].sum())
    return (keys.astype(np.int32), m['augment_input_tokens'][:n], m['augment_read_keys'][:n],
            m['augment_segment_ids'][:n], m['augment_causal_attention'][:n])

  def add(example):
    inputs, targets = example['inputs'], example['targets']
    if in_len is not None:
      inputs = inputs[:in_len]
    if tg_len is not None:
      targets = targets[:tg_len]
    out = tf.numpy_function(compute, [inputs, targets, example['inputs_pretokenized'],
                                      example['targets_pretokenized']], [tf.int32] * 5,
                            stateful=False)
    for tensor in out:
      tensor.set_shape([None])
    return {**example, 'inputs': inputs, 'targets': targets,
            **dict(zip(alignment.STREAM_FEATURES, out))}
  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def aligned_seq2seq_task(name: str, anchor_vocabulary: seqio.Vocabulary,
                         augment_vocabulary: seqio.Vocabulary,
                         rows: Callable[[str], Sequence[dict[str, str]]],
                         metric_fns: Sequence[Callable] = (),
                         postprocess_fn: Callable | None = None,
                         splits: Sequence[str] = ('train', 'validation'),
                         keep_prompt_end: bool = False) -> None:
  """`seq2seq_task` for a composition whose augment has its own tokenizer: the anchor's
  features as there, and the augment's stream (`aligned_features`); `calm_jax.data` passes
  them through seqio's prefix-LM converter (unpacked)."""
  preprocessors = [seqio.preprocessors.tokenize]
  bos = vocab_lib.model_bos_id(anchor_vocabulary)
  if keep_prompt_end:
    preprocessors.append(functools.partial(keep_inputs_end, reserve=int(bos is not None)))
  if bos is not None:
    preprocessors.append(functools.partial(prepend_bos, bos_id=bos))
  preprocessors += [seqio.preprocessors.append_eos_after_trim,
                    functools.partial(aligned_features, anchor_vocabulary=anchor_vocabulary,
                                      augment_vocabulary=augment_vocabulary)]
  replace_task(
      name, source=memory_source(rows, splits), preprocessors=preprocessors,
      output_features={'inputs': seqio.Feature(anchor_vocabulary, add_eos=False),
                       'targets': seqio.Feature(anchor_vocabulary, add_eos=True),
                       'augment_input_tokens': seqio.Feature(augment_vocabulary,
                                                             add_eos=False, required=False)},
      postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))
