"""SeqIO tasks of the key-value arithmetic experiment (CALM section 4.1); importing registers them.

Tasks (each with 'train' and 'validation' splits of (inputs, targets) pairs):
  kv_substitution          'k3 + k7 - k2 ->' => '3 + 7 - 2', over all keys    (trains m_A)
  numeric_arithmetic       '3 + 7 - 2 ='     => '8'                             (trains m_B)
  kv_arithmetic_held_in    'k3 + k7 - k2 ='  => '8', held-in keys only (the key-only D_C)
  kv_arithmetic_held_out   the same over held-out keys only (evaluation; its 'train' split
                           exists for symmetry and is never used by the experiment)
  kv_substitution_held_in  KV-Substitution over held-in keys only (part of the mixed D_C)
  kv_substitution_augment  KV-Substitution over all keys, asked with '->' or '=' (each half):
                           m_A's training set, so that m_A reads KV-Arithmetic's questions
                           ('k3 + k7 - k2 =') as its own, as in the paper

Mixtures:
  kv_composition      the composition set D_C as CALM trains it: KV-Arithmetic over held-in
                      keys, plus shares of the anchor's own skill (Numeric-Arithmetic) and of
                      the augment's (KV-Substitution over held-in keys), so that the bridges
                      learn the new skill without overriding the old ones. Rates:
                      `composition_mixture(...)` (gin: `@kv_arithmetic.composition_mixture()`).
  kv_arithmetic_eval  the three evaluation tasks (KV-Substitution, Numeric-Arithmetic,
                      KV-Arithmetic over held-out keys), for one calm-eval call per model.

No task of kv_composition holds a held-out key.

Other key repositories (the data seed, `KVSpec.seed`): `for_data_seed(name, seed)` registers
the tasks of KVSpec(seed=seed) under the prefix 'kv_seed<seed>_' and returns the name of
`name`'s counterpart there (a mixture keeps its rates).

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

# Appended, never reordered: a task's index seeds its examples.
TASKS = ('kv_substitution', 'numeric_arithmetic', 'kv_arithmetic_held_in',
         'kv_arithmetic_held_out', 'kv_substitution_held_in', 'kv_substitution_augment')
COMPOSITION_MIXTURE = 'kv_composition'
# Shares of the default composition mixture: mostly the new skill, a tenth each of the old ones
# (measured on the default experiment: 0.5 / 0.25 / 0.25 keeps both old skills too but learns
# less of the new one in the same steps; see the README).
COMPOSITION_RATES = {'kv_arithmetic_held_in': 0.8, 'numeric_arithmetic': 0.1,
                     'kv_substitution_held_in': 0.1}
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
  if task == 'kv_substitution_augment':
    return tuple(kv_data.kv_substitution(spec, n, seed, keys='all',
                                         asked_with=(kv_data.SUBSTITUTE, kv_data.EQUALS)))
  if task in ('kv_substitution', 'kv_substitution_held_in'):
    keys = 'held_in' if task == 'kv_substitution_held_in' else 'all'
    return tuple(kv_data.kv_substitution(spec, n, seed, keys=keys))
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
  _add_mixture(prefix + 'kv_arithmetic_eval', [(names[0], 1.0), (names[1], 1.0),
                                                (names[3], 1.0)])
  composition_mixture(prefix=prefix)
  return names


def _add_mixture(name: str, tasks: Sequence[tuple[str, float]]) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(tasks))


def composition_mixture(arithmetic: float = COMPOSITION_RATES['kv_arithmetic_held_in'],
                        numeric: float = COMPOSITION_RATES['numeric_arithmetic'],
                        substitution: float = COMPOSITION_RATES['kv_substitution_held_in'],
                        prefix: str = '') -> str:
  """(Re-)registers the composition mixture `prefix + 'kv_composition'` and returns its name.

  Args:
    arithmetic: rate of KV-Arithmetic over held-in keys (the new skill).
    numeric: rate of Numeric-Arithmetic (the anchor's skill); 0 leaves it out.
    substitution: rate of KV-Substitution over held-in keys (the augment's skill); 0 leaves
      it out.
    prefix: the task prefix of `register`.

  Rates are relative (seqio normalises them). In gin: `MIXTURE_OR_TASK_NAME =
  @kv_arithmetic.composition_mixture()` with `kv_arithmetic.composition_mixture.numeric = 0.1`.
  """
  rates = [(prefix + 'kv_arithmetic_held_in', arithmetic), (prefix + 'numeric_arithmetic', numeric),
           (prefix + 'kv_substitution_held_in', substitution)]
  if any(rate < 0 for _, rate in rates) or arithmetic <= 0:
    raise ValueError(f'composition_mixture rates must be >= 0, arithmetic > 0; got {rates}.')
  name = prefix + COMPOSITION_MIXTURE
  _add_mixture(name, [(task, rate) for task, rate in rates if rate > 0])
  return name


def for_data_seed(name: str, data_seed: int) -> str:
  """The name of task or mixture `name` over the key repository of KVSpec(seed=data_seed).

  The default repository's names are returned as they are. For another seed, its tasks are
  registered (once) under the prefix 'kv_seed<seed>_'; a mixture of the default tasks (such as
  `kv_composition` with gin-set rates) is re-registered over that seed's tasks with the same
  rates.

  Raises:
    ValueError: `name` is neither one of these tasks nor a mixture of them.
  """
  if data_seed == kv_data.KVSpec().seed:
    return name
  prefix = f'kv_seed{data_seed}_'
  if prefix + TASKS[0] not in seqio.TaskRegistry.names():
    register(kv_data.KVSpec(seed=data_seed), prefix)
  if name in TASKS:
    return prefix + name
  try:
    mixture = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f'Unknown task or mixture {name!r}.') from e
  tasks = getattr(mixture, 'tasks', [mixture])
  unknown = [t.name for t in tasks if t.name not in TASKS]
  if not isinstance(mixture, seqio.Mixture) or unknown:
    raise ValueError(f'{name!r} is not a key-value task or a mixture of them (only those '
                     f'have other data seeds); not ours: {unknown or [name]}.')
  _add_mixture(prefix + name, [(prefix + t, rate) for t, rate in rates(name).items()])
  return prefix + name


def rates(name: str) -> dict[str, float]:
  """{task: rate} of mixture `name`; a task alone is {name: 1.0}."""
  mixture = seqio.get_mixture_or_task(name)
  if not isinstance(mixture, seqio.Mixture):
    return {name: 1.0}
  return {t.name: mixture.get_rate(t) for t in mixture.tasks}


register()
