"""Synthetic data of the key-value arithmetic experiment (CALM, section 4.1, Table 1).

A repository of `num_keys` keys, each a single vocabulary token ('k0', 'k1', ...), maps to an
integer value. Three datasets of (inputs, targets) strings, whitespace-tokenised:

  KV-Substitution     'k3 + k7 - k2 ->'  =>  '3 + 7 - 2'
  Numeric-Arithmetic  '3 + 7 - 2 ='      =>  '8'
  KV-Arithmetic       'k3 + k7 - k2 ='   =>  '8'

KV-Substitution asks with '->' and the arithmetic tasks with '=': the composition set mixes
KV-Substitution and KV-Arithmetic over the same keys, and one expression cannot have two
answers (the paper's PaLM models are told the task in their prompts). m_A, which knows
substitution only, is trained on questions asked both ways (the paper's KV-Substitution inputs
are KV-Arithmetic's), so that it reads KV-Arithmetic's questions as it reads its own.

Results are written digit by digit with a leading '-' for negatives ('- 1 2', '1 8'), so that a
key, a value and a digit are each one token and the anchor sees the same input structure on
KV-Arithmetic as on Numeric-Arithmetic, only with keys in place of digits.

Differences from the paper (sized for a 2-core CPU): 500 single-token keys instead of 25K
multi-character strings; values 0..9 (not unique, 50 keys per value) instead of unique values in
[1, N_KV]; 2-3 operands with + and - instead of 3-6 operands with +, -, x. The held-in split keeps
the paper's 20 % of the keys, chosen so that every value occurs among the held-in keys (the
bridges learn a map from the augment's representation of a value to the anchor's digit; a value
never seen in composition could not be learned). 500 keys, not 200: with 200 the held-in set
has 4 keys per value, and what the bridges learn from them reaches held-out keys in some key
repositories and not in others (over three repositories, 59-83 % on held-out KV-Arithmetic); with
100 held-in keys, 10 per value, it does in every one tried (see the README).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

PAD, EOS, UNK = '<pad>', '<eos>', '<unk>'
OPERATORS = ('+', '-')
EQUALS = '='  # Ends an arithmetic question.
SUBSTITUTE = '->'  # Ends a substitution question.
MAX_VALUE = 99  # Values above 9 are tokens of their own ('13'), after the digits.
KEY_SETS = ('all', 'held_in', 'held_out')


@dataclasses.dataclass(frozen=True)
class KVSpec:
  """The key repository and the expression distribution.

  Attributes:
    num_keys: N_KV, number of keys 'k0' ... 'k{N-1}', each one token.
    min_value: smallest value of a key (inclusive).
    max_value: largest value of a key (inclusive), at most MAX_VALUE. A value is one token
      ('7', '13'); results are written digit by digit ('1 3').
    min_operands: fewest operands of an expression.
    max_operands: most operands of an expression (inclusive).
    operators: binary operators between operands, drawn uniformly.
    held_in_fraction: fraction of the keys whose KV-Arithmetic is the composition set D_C.
    seed: seed of the key values and of the held-in / held-out split.
  """

  num_keys: int = 500
  min_value: int = 0
  max_value: int = 9
  min_operands: int = 2
  max_operands: int = 3
  operators: tuple[str, ...] = OPERATORS
  held_in_fraction: float = 0.2
  seed: int = 0

  def __post_init__(self):
    if not 0 <= self.min_value <= self.max_value <= MAX_VALUE:
      raise ValueError(f'Values must lie in [0, {MAX_VALUE}], got [{self.min_value}, '
                       f'{self.max_value}].')
    if not 1 <= self.min_operands <= self.max_operands:
      raise ValueError(f'Bad operand counts [{self.min_operands}, {self.max_operands}].')
    unknown = set(self.operators) - set(OPERATORS)
    if unknown or not self.operators:
      raise ValueError(f'Operators must be a non-empty subset of {OPERATORS}, got '
                       f'{self.operators}.')
    if round(self.held_in_fraction * self.num_keys) < self.num_values:
      raise ValueError(f'{self.held_in_fraction} of {self.num_keys} keys cannot cover all '
                       f'{self.num_values} values.')

  @property
  def num_values(self) -> int:
    """Number of distinct values."""
    return self.max_value - self.min_value + 1


def vocabulary(spec: KVSpec) -> list[str]:
  """The token list: pad (id 0), eos (id 1), unk, digits, operators, '=', '->', the values
  above 9 (if any), then the keys."""
  return ([PAD, EOS, UNK] + [str(d) for d in range(10)] + list(OPERATORS)
          + [EQUALS, SUBSTITUTE] + [str(v) for v in range(10, spec.max_value + 1)]
          + [f'k{i}' for i in range(spec.num_keys)])


def encode(text: str, vocab: Sequence[str] | Mapping[str, int]) -> list[int]:
  """Token ids of a whitespace-separated string (unknown words map to <unk>).

  Args:
    text: whitespace-separated tokens.
    vocab: the token list, or its {token: id} index (faster when encoding many strings).
  """
  index = vocab if isinstance(vocab, Mapping) else {t: i for i, t in enumerate(vocab)}
  return [index.get(word, index[UNK]) for word in text.split()]


def key_values(spec: KVSpec) -> dict[str, int]:
  """The repository {key token: value}, deterministic from `spec.seed`.

  Values cycle through the range before being shuffled, so every value has about
  num_keys / num_values keys.
  """
  rng = np.random.default_rng(spec.seed)
  values = spec.min_value + np.arange(spec.num_keys) % spec.num_values
  rng.shuffle(values)
  return {f'k{i}': int(v) for i, v in enumerate(values)}


def split_keys(spec: KVSpec) -> tuple[list[str], list[str]]:
  """(held-in keys, held-out keys), disjoint, deterministic from `spec.seed`.

  The held-in set has round(held_in_fraction * num_keys) keys, spread as evenly as possible over
  the values (so every value occurs among them).
  """
  repo = key_values(spec)
  rng = np.random.default_rng(spec.seed + 1)
  num_in = int(round(spec.held_in_fraction * spec.num_keys))
  by_value = {v: [k for k, kv in repo.items() if kv == v]
              for v in range(spec.min_value, spec.max_value + 1)}
  for keys in by_value.values():
    rng.shuffle(keys)
  held_in = []
  rank = 0
  while len(held_in) < num_in:  # Round-robin over the values.
    for v in sorted(by_value):
      if len(held_in) < num_in and rank < len(by_value[v]):
        held_in.append(by_value[v][rank])
    rank += 1
  held = set(held_in)
  return sorted(held_in, key=_key_index), [k for k in repo if k not in held]


def _key_index(key: str) -> int:
  return int(key[1:])


def keys_of(spec: KVSpec, keys: str) -> list[str]:
  """The keys of one of KEY_SETS: 'all', 'held_in' or 'held_out'."""
  if keys not in KEY_SETS:
    raise ValueError(f'keys must be one of {KEY_SETS}, got {keys!r}.')
  if keys == 'all':
    return list(key_values(spec))
  held_in, held_out = split_keys(spec)
  return held_in if keys == 'held_in' else held_out


def format_number(n: int) -> str:
  """Digit by digit, '-' first if negative: -12 -> '- 1 2', 7 -> '7'."""
  return ('- ' if n < 0 else '') + ' '.join(str(abs(n)))


def _expressions(spec: KVSpec, n: int, seed: int, symbols: Sequence[str]):
  """n random (operand symbols, operators) drawn with replacement."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    count = int(rng.integers(spec.min_operands, spec.max_operands + 1))
    operands = [symbols[i] for i in rng.integers(0, len(symbols), count)]
    ops = [spec.operators[i] for i in rng.integers(0, len(spec.operators), count - 1)]
    out.append((operands, ops))
  return out


def _join(operands: Sequence[str], ops: Sequence[str]) -> str:
  words = [str(operands[0])]
  for op, x in zip(ops, operands[1:]):
    words += [op, str(x)]
  return ' '.join(words)


def evaluate(values: Sequence[int], ops: Sequence[str]) -> int:
  """Left-to-right value of values[0] ops[0] values[1] ...."""
  total = values[0]
  for op, v in zip(ops, values[1:]):
    total = total + v if op == '+' else total - v
  return total


def kv_substitution(spec: KVSpec, n: int, seed: int, keys: str = 'all',
                    asked_with: Sequence[str] = (SUBSTITUTE,)) -> list[tuple[str, str]]:
  """n KV-Substitution examples: ('k3 + k7 - k2 ->', '3 + 7 - 2') over the `keys` set.

  Args:
    spec: the repository.
    n: number of examples.
    seed: seed of the expressions.
    keys: one of KEY_SETS.
    asked_with: the question marks, drawn uniformly per example: the default asks with '->';
      (SUBSTITUTE, EQUALS) also asks half of them as the paper does, with KV-Arithmetic's
      '=' (m_A's training set: m_A answers any question over keys with the substitution).
  """
  repo = key_values(spec)
  marks = np.random.default_rng(seed + 7919).integers(0, len(asked_with), n)
  out = []
  for (operands, ops), mark in zip(_expressions(spec, n, seed, keys_of(spec, keys)), marks):
    out.append((f'{_join(operands, ops)} {asked_with[mark]}',
                _join([repo[k] for k in operands], ops)))
  return out


def numeric_arithmetic(spec: KVSpec, n: int, seed: int) -> list[tuple[str, str]]:
  """n Numeric-Arithmetic examples: ('3 + 7 - 2 =', '8'), operands in the value range."""
  digits = [str(v) for v in range(spec.min_value, spec.max_value + 1)]
  out = []
  for operands, ops in _expressions(spec, n, seed, digits):
    result = evaluate([int(d) for d in operands], ops)
    out.append((f'{_join(operands, ops)} {EQUALS}', format_number(result)))
  return out


def kv_arithmetic(spec: KVSpec, n: int, seed: int,
                  keys: str = 'held_in') -> list[tuple[str, str]]:
  """n KV-Arithmetic examples: ('k3 + k7 - k2 =', '8'), every key from the `keys` set.

  keys='held_in' gives the composition data D_C; keys='held_out' the evaluation set, whose
  expressions contain held-out keys only (so no evaluation expression occurs in D_C).
  """
  repo = key_values(spec)
  out = []
  for operands, ops in _expressions(spec, n, seed, keys_of(spec, keys)):
    out.append((f'{_join(operands, ops)} {EQUALS}',
                format_number(evaluate([repo[k] for k in operands], ops))))
  return out


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
  """Percentage of predictions equal to their target (whitespace-normalised)."""
  if len(predictions) != len(targets):
    raise ValueError(f'{len(predictions)} predictions for {len(targets)} targets.')
  if not targets:
    return 0.0
  hits = sum(' '.join(p.split()) == ' '.join(t.split()) for p, t in zip(predictions, targets))
  return 100.0 * hits / len(targets)
