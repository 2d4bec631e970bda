"""SeqIO tasks of the key-value arithmetic experiment (CALM section 4.1); importing registers them.

Tasks (each with 'train' and 'validation' splits of (inputs, targets) pairs):
  kv_substitution         'k3 + k7 - k2 =' -> '3 + 7 - 2', over all keys      (trains m_A)
  numeric_arithmetic      '3 + 7 - 2 ='    -> '8'                               (trains m_B)
  kv_arithmetic_held_in   'k3 + k7 - k2 =' -> '8', held-in keys only  (the composition set D_C)
  kv_arithmetic_held_out  the same over held-out keys only (evaluation; its 'train' split
                          exists for symmetry and is never used by the experiment)

Mixture kv_arithmetic_eval: the three evaluation tasks (KV-Substitution, Numeric-Arithmetic,
KV-Arithmetic over held-out keys), for one calm-eval call per model.

Metric: exact match of the whole target, in percent ('accuracy'). `register(spec, ...)` makes
another variant under a name prefix; `kv_data.py` documents the data and how it differs from
the paper.
"""

from __future__ import annotations

import functools
from typing import Sequence

import seqio
import tensorflow as tf

from calm_tasks import kv_data
from calm_tasks.vocabularies import WordVocabulary

TASKS = ('kv_substitution', 'numeric_arithmetic', 'kv_arithmetic_held_in',
         'kv_arithmetic_held_out')
TRAIN_EXAMPLES = 100_000
EVAL_EXAMPLES = 500
# Seeds of the example streams, distinct per split so validation never repeats train's draws.
_SPLIT_SEEDS = {'train': 1, 'validation': 2}


def vocabulary(spec: kv_data.KVSpec) -> WordVocabulary:
  """The task vocabulary: ids equal to kv_data.vocabulary's indices."""
  words = kv_data.vocabulary(spec)
  assert words[:3] == [kv_data.PAD, kv_data.EOS, kv_data.UNK]
  return WordVocabulary(words[3:])


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Exact-match accuracy in percent (seqio metric function)."""
  return {'accuracy': kv_data.exact_match(list(predictions), list(targets))}


@functools.lru_cache(maxsize=16)  # A run reads a split twice (start-up checks, training).
def _examples(spec: kv_data.KVSpec, task: str, split: str, num_train: int,
              num_eval: int) -> tuple[tuple[str, str], ...]:
  n = num_train if split == 'train' else num_eval
  seed = spec.seed * 100 + _SPLIT_SEEDS[split] * 10 + TASKS.index(task)
  if task == 'kv_substitution':
    return tuple(kv_data.kv_substitution(spec, n, seed))
  if task == 'numeric_arithmetic':
    return tuple(kv_data.numeric_arithmetic(spec, n, seed))
  keys = 'held_in' if task == 'kv_arithmetic_held_in' else 'held_out'
  return tuple(kv_data.kv_arithmetic(spec, n, seed, keys=keys))


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, spec, task,
                num_train, num_eval) -> tf.data.Dataset:
  del shuffle_files, seed  # In-memory data; seqio shuffles examples itself.
  pairs = _examples(spec, task, split, num_train, num_eval)
  return tf.data.Dataset.from_tensor_slices({'inputs': [p[0] for p in pairs],
                                             'targets': [p[1] for p in pairs]})


def register(spec: kv_data.KVSpec = kv_data.KVSpec(), prefix: str = '',
             num_train: int = TRAIN_EXAMPLES, num_eval: int = EVAL_EXAMPLES) -> list[str]:
  """Registers the four tasks of `spec` as `prefix + name` and returns their names."""
  vocab = vocabulary(spec)
  features = {'inputs': seqio.Feature(vocab, add_eos=False),
              'targets': seqio.Feature(vocab, add_eos=True)}
  names = []
  for task in TASKS:
    name = prefix + task
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, spec=spec, task=task, num_train=num_train,
                              num_eval=num_eval),
            splits=('train', 'validation')),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=features,
        metric_fns=[accuracy])
    names.append(name)
  mixture = prefix + 'kv_arithmetic_eval'
  if mixture in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [names[0], names[1], names[3]], default_rate=1.0)
  return names


register()
