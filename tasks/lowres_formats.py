"""Published layouts and prompt formats of the low-resource-language benchmarks (no TensorFlow).

Readers (local or `gs://` paths; a malformed file is one `FormatError` naming file and line):
  FLORES-200   `{root}/{split}/{lang}_{Script}.{split}`, split 'dev' or 'devtest', one
               sentence per line, line n of every language the same sentence.
  GSM8K        JSONL, one problem per line: {"question": ..., "answer": "...#### 42"}.
  MGSM         TSV, one problem per line: question <TAB> numeric answer (no header).

Prompts, as the paper evaluates (CALM section 4.2):
  translation  k-shot (5 in the paper): "Chichewa: <src>\\nEnglish: <tgt>\\n\\n" per shot, then
               "Chichewa: <src>\\nEnglish:"; the target is the reference translation.
  math         k-shot (8 in the paper) chains: "Question: <q>\\nAnswer: <chain> The answer is
               <n>.\\n\\n" per shot, then "Question: <q>\\nAnswer:"; the target is the chain;
               scored by exact match of the final number (`final_number`).

Shots are drawn deterministically (`shot_indices`): the same example always gets the same shots,
and never itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Sequence

from etils import epath

LANGUAGE_NAMES = {'nya': 'Chichewa', 'en': 'English', 'eng_Latn': 'English',
                  'nya_Latn': 'Chichewa'}


class FormatError(ValueError):
  """A benchmark file that is not in its published layout."""


@dataclasses.dataclass(frozen=True)
class MathProblem:
  """A math word problem: its question, worked solution (may be empty) and final number."""
  question: str
  chain: str
  answer: str


def _read_lines(path: str | epath.Path) -> list[str]:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  return path.read_text(encoding='utf-8').splitlines()


def flores_file(root: str | epath.Path, language: str, split: str) -> epath.Path:
  """`{root}/{split}/{language}.{split}` (e.g. language 'nya_Latn', split 'devtest')."""
  if split not in ('dev', 'devtest'):
    raise ValueError(f"FLORES-200 splits are 'dev' and 'devtest', not {split!r}.")
  return epath.Path(root) / split / f'{language}.{split}'


def read_flores(root: str | epath.Path, source: str, target: str,
                split: str) -> list[tuple[str, str]]:
  """(source, target) sentence pairs of one FLORES-200 split.

  Raises:
    FileNotFoundError: a language file is missing.
    FormatError: the two files differ in length, or a line is empty.
  """
  files = [flores_file(root, lang, split) for lang in (source, target)]
  sides = [_read_lines(f) for f in files]
  if len(sides[0]) != len(sides[1]):
    raise FormatError(f'{files[0]} has {len(sides[0])} lines but {files[1]} has '
                      f'{len(sides[1])}: FLORES-200 files are line-aligned.')
  for f, lines in zip(files, sides):
    for n, line in enumerate(lines, 1):
      if not line.strip():
        raise FormatError(f'{f}:{n}: empty line (FLORES-200 has one sentence per line).')
  return [(s.strip(), t.strip()) for s, t in zip(*sides)]


_GSM8K_ANSWER = re.compile(r'####\s*(-?[\d,]*\.?\d+)\s*$')
# GSM8K writes calculator annotations into its chains ("<<48/2=24>>"): dropped.
_CALCULATOR = re.compile(r'<<[^>]*>>')


def _number(text: str) -> str:
  """A number as the metric compares it: no thousands separators, no trailing '.0'."""
  text = text.replace(',', '').strip()
  if '.' in text:
    text = text.rstrip('0').rstrip('.')
  return text or '0'


def read_gsm8k(path: str | epath.Path) -> list[MathProblem]:
  """The problems of a GSM8K JSONL file (chains without the calculator annotations).

  Raises:
    FileNotFoundError: no such file.
    FormatError: a line that is not JSON with "question" and an "answer" ending in "#### N".
  """
  problems = []
  for n, line in enumerate(_read_lines(path), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      question, answer = record['question'], record['answer']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise FormatError(f'{path}:{n}: expected JSON with "question" and "answer" ({e}).') from e
    match = _GSM8K_ANSWER.search(answer)
    if not isinstance(question, str) or match is None:
      raise FormatError(f'{path}:{n}: the answer does not end in "#### <number>".')
    chain = _CALCULATOR.sub('', answer[:match.start()]).strip()
    problems.append(MathProblem(question.strip(), ' '.join(chain.split()),
                                _number(match.group(1))))
  return problems


def read_mgsm(path: str | epath.Path) -> list[MathProblem]:
  """The problems of an MGSM TSV file (question, numeric answer; no chains).

  Raises:
    FileNotFoundError: no such file.
    FormatError: a line without exactly one tab, or whose answer is not a number.
  """
  problems = []
  for n, line in enumerate(_read_lines(path), 1):
    if not line.strip():
      continue
    parts = line.split('\t')
    if len(parts) != 2 or not re.fullmatch(r'-?[\d,]*\.?\d+', parts[1].strip()):
      raise FormatError(f'{path}:{n}: expected "question<TAB>number".')
    problems.append(MathProblem(parts[0].strip(), '', _number(parts[1])))
  return problems


def shot_indices(pool_size: int, k: int, index: int, seed: int = 0,
                 exclude: int | None = None) -> list[int]:
  """`k` distinct indices into a pool of `pool_size` shots for example `index`: a function of
  (seed, index) only, never `exclude` (the example itself where the pool holds it)."""
  available = pool_size - (exclude is not None and 0 <= exclude < pool_size)
  if k > available:
    raise ValueError(f'{k} shots asked from a pool of {available}.')
  chosen: list[int] = []
  counter = 0
  while len(chosen) < k:
    digest = hashlib.sha256(f'{seed}|{index}|{counter}'.encode()).digest()
    candidate = int.from_bytes(digest[:8], 'big') % pool_size
    counter += 1
    if candidate != exclude and candidate not in chosen:
      chosen.append(candidate)
  return chosen


def translation_prompt(source: str, shots: Sequence[tuple[str, str]], source_language: str,
                       target_language: str) -> str:
  """The k-shot translation prompt for `source` (module docstring)."""
  src = LANGUAGE_NAMES.get(source_language, source_language)
  tgt = LANGUAGE_NAMES.get(target_language, target_language)
  head = ''.join(f'{src}: {s}\n{tgt}: {t}\n\n' for s, t in shots)
  return f'{head}{src}: {source}\n{tgt}:'


def math_prompt(question: str, shots: Sequence[MathProblem]) -> str:
  """The k-shot chain-of-thought prompt for `question` (module docstring)."""
  head = ''.join(f'Question: {p.question}\nAnswer: {math_target(p)}\n\n' for p in shots)
  return f'{head}Question: {question}\nAnswer:'


def math_target(problem: MathProblem) -> str:
  """The chain and final sentence a model is trained to write."""
  end = f'The answer is {problem.answer}.'
  return f'{problem.chain} {end}' if problem.chain else end


_LAST_NUMBER = re.compile(r'-?[\d,]*\.?\d+')


def final_number(text: str) -> str | None:
  """The number a solution ends with ("The answer is 42." -> '42'), or None."""
  numbers = _LAST_NUMBER.findall(text)
  return _number(numbers[-1]) if numbers else None
