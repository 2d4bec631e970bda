"""SeqIO tasks of the low-resource-language domain (CALM section 4.2).

Nothing is registered on import; each `register_*` function registers (or replaces) its tasks
and returns a name, so that a gin file can write `MIXTURE_OR_TASK_NAME = @lowres.register_*()`.

On the Bibles (`bible_data`: Chichewa and English, verse-aligned, four held-out books), with
`register_bible(vocabulary_path, ...)`; 'train' splits read only the training books and
'validation' splits only the held-out books; every task has 'inputs' and 'targets' (empty
inputs for language modelling):
  bible_nya_lm          Chichewa verses                                 (m_A's training set)
  bible_en_lm           English verses       (m_B's training set; English LM perplexity)
  bible_nya_en          nya->en translation: 'train' is D_C, DC_SHARE of the training books'
                        parallel verses; 'validation' every parallel verse of the held-out books
  bible_nya_en_slice    a disjoint ANCHOR_PAIR_SHARE of the training pairs, the little Chichewa
                        that m_B sees (the paper's anchor knows a little of many languages)
Mixtures (rates as `mixture_rates` gives, set from gin through `register_bible`):
  bible_anchor          bible_en_lm + bible_nya_en_slice                (trains m_B)
  bible_dc              bible_nya_en (D_C) + a share of bible_en_lm, so that the composition
                        keeps the anchor's English
  bible_eval            bible_nya_en + bible_en_lm (held-out books: chrF/BLEU, perplexity)

On published benchmark files (local or `gs://`, `lowres_formats` documents the layouts):
  register_flores(root, language)   flores_<lang>_en: XX->En, k-shot (5) from 'dev',
                                    evaluated on 'devtest' (its 'validation' split)
  register_math(name, eval_file)    GSM8K JSONL or MGSM TSV, k-shot (8) chains from a GSM8K
                                    train file, exact match of the final number
  NTL-style monolingual corpora are text files: `calm_tasks.text_lm.register_text_lm`.

Metrics (`text_metrics`): chrF1 and BLEU (sacrebleu) for translation, final-number accuracy for
math; translations are scored up to their first newline (`first_line`). Vocabulary: one
SentencePiece model for both languages, trained by `bible_vocabulary` on the training books'
text only, or any seqio vocabulary file or LM checkpoint's vocabulary given.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Sequence

from etils import epath
import seqio

from calm_jax import vocab as vocab_lib
from calm_tasks import bible_data, lowres_formats, memory_tasks, text_lm, text_metrics

DC_SHARE = 0.05
ANCHOR_PAIR_SHARE = 0.01
DEFAULT_RATES = {'bible_anchor': {'bible_en_lm': 0.95, 'bible_nya_en_slice': 0.05},
                 'bible_dc': {'bible_nya_en': 0.8, 'bible_en_lm': 0.2}}
VOCAB_SIZE = 8000
BIBLE_NAMES = ('bible_nya_lm', 'bible_en_lm', 'bible_nya_en', 'bible_nya_en_slice',
               'bible_anchor', 'bible_dc', 'bible_eval')


def cache_dir() -> str:
  """Where derived files (the Bible SentencePiece model) are kept: $CALM_JAX_CACHE, else
  ~/.cache/calm_jax."""
  return os.environ.get('CALM_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'calm_jax')


def bible_vocabulary(path: str | None = None, vocab_size: int = VOCAB_SIZE,
                     languages: Sequence[str] = bible_data.LANGUAGES) -> seqio.Vocabulary:
  """The SentencePiece vocabulary at `path`, trained there first if it does not exist.

  Trained (unigram, byte fallback, pad 0 / EOS 1 / UNK 2, no BOS: T5X's ids) on the verses of
  the training books only in `languages` (default Chichewa and English; ('nya',) gives an
  augment's own Chichewa vocabulary); deterministic for a given `vocab_size`. Default path:
  `cache_dir()/bible_spm_<vocab_size>.model` (`_<languages>` before `.model` for other
  languages). A `path` that is an LM checkpoint with a vocabulary (e.g. `calm-convert`'s
  Gemma 3 270M) gives that checkpoint's vocabulary.
  """
  languages = tuple(languages)
  unknown = sorted(set(languages) - set(bible_data.LANGUAGES))
  if unknown or not languages:
    raise ValueError(f'Bible languages {list(languages)}: known {list(bible_data.LANGUAGES)}.')
  suffix = '' if languages == tuple(bible_data.LANGUAGES) else '_' + '_'.join(languages)
  path = path or os.path.join(cache_dir(), f'bible_spm_{vocab_size}{suffix}.model')
  if vocab_lib.has_vocabulary(epath.Path(path)):
    return vocab_lib.load_vocabulary(epath.Path(path))
  if not epath.Path(path).exists():
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
      corpus = os.path.join(tmp, 'train.txt')
      with open(corpus, 'w', encoding='utf-8') as f:
        for language in languages:
          f.writelines(t + '\n' for t in bible_data.monolingual(language, held_out=False))
      prefix = os.path.join(tmp, 'spm')
      spm.SentencePieceTrainer.train(
          input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type='unigram',
          character_coverage=1.0, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
          bos_id=-1, num_threads=1, minloglevel=2)
      epath.Path(prefix + '.model').copy(epath.Path(path + '.tmp'), overwrite=True)
      epath.Path(path + '.tmp').replace(path)
  return seqio.SentencePieceVocabulary(str(path))


def first_line(text: str, example: Any = None, is_target: bool = False) -> str:
  """A translation's seqio postprocessor: the text up to its first newline (the k-shot
  prompts put one translation per line, so a model that goes on writes the next prompt)."""
  del example, is_target
  return text.split('\n', 1)[0]


def translation_rows(pairs: Sequence[tuple[str, str]], pool: Sequence[tuple[str, str]],
                     shots: int, source: str, target: str, seed: int = 0,
                     pool_is_pairs: bool = False) -> list[dict[str, str]]:
  """{'inputs': k-shot prompt, 'targets': translation} for each (source, target) pair, with
  shots from `pool` (when `pool_is_pairs`, the pool is `pairs` itself and an example never
  shows itself)."""
  rows = []
  for i, (src, tgt) in enumerate(pairs):
    chosen = lowres_formats.shot_indices(len(pool), shots, i, seed,
                                         exclude=i if pool_is_pairs else None)
    rows.append({'inputs': lowres_formats.translation_prompt(
        src, [pool[j] for j in chosen], source, target), 'targets': tgt})
  return rows


def mixture_rates(name: str, rates: dict[str, dict[str, float]] | None = None
                  ) -> dict[str, float]:
  """The task rates of Bible mixture `name` ('bible_anchor' or 'bible_dc'), `rates`
  overriding DEFAULT_RATES."""
  merged = {**DEFAULT_RATES, **(rates or {})}
  if name not in merged:
    raise ValueError(f'Unknown Bible mixture {name!r}; known: {sorted(merged)}.')
  return dict(merged[name])


@functools.lru_cache(maxsize=4)
def _bible_pairs(share: float, salt: str) -> tuple[tuple[str, str], ...]:
  return tuple(bible_data.texts(bible_data.fraction(bible_data.parallel(held_out=False), share,
                                                    salt)))


def bible_splits(dc_share: float = DC_SHARE, anchor_pair_share: float = ANCHOR_PAIR_SHARE
                 ) -> dict[str, tuple[tuple[str, str], ...]]:
  """The parallel pairs of the Bible tasks: 'dc' (D_C), 'slice' (m_B's, disjoint from D_C)
  and 'held_out' (every parallel verse of the held-out books)."""
  dc = _bible_pairs(dc_share, 'dc')
  dc_set = set(dc)
  slice_ = tuple(p for p in _bible_pairs(anchor_pair_share, 'anchor') if p not in dc_set)
  return {'dc': dc, 'slice': slice_,
          'held_out': tuple(bible_data.texts(bible_data.parallel(held_out=True)))}


def register_bible(vocabulary_path: str | None = None, *, task: str = 'bible_dc',
                   shots: int = 0, dc_share: float = DC_SHARE,
                   anchor_pair_share: float = ANCHOR_PAIR_SHARE,
                   rates: dict[str, dict[str, float]] | None = None,
                   prefix: str = '') -> str:
  """Registers the Bible tasks and mixtures (module docstring); returns `prefix + task`.

  Args:
    vocabulary_path: SentencePiece model (trained there by `bible_vocabulary` if missing;
      None: the cached default).
    task: the task or mixture whose name is returned (e.g. 'bible_anchor' for m_B's run).
    shots: k of the k-shot translation prompts; shots come from D_C, never from the
      held-out books, and a D_C example never shows itself.
    dc_share: the share of the training books' parallel verses in D_C.
    anchor_pair_share: the share of parallel training verses in m_B's training set.
    rates: {mixture: {task: rate}} overriding DEFAULT_RATES.
    prefix: prepended to every task and mixture name.
  """
  if task not in BIBLE_NAMES:
    raise ValueError(f'Unknown Bible task or mixture {task!r}; known: {", ".join(BIBLE_NAMES)}.')
  vocabulary = bible_vocabulary(vocabulary_path)
  pairs = bible_splits(dc_share, anchor_pair_share)
  if shots > len(pairs['dc']) - 1:
    raise ValueError(f'{shots} shots but D_C holds {len(pairs["dc"])} pairs.')
  for language in bible_data.LANGUAGES:
    memory_tasks.lm_task(f'{prefix}bible_{language}_lm', vocabulary, functools.partial(
        lambda split, lang: bible_data.monolingual(lang, held_out=split == 'validation'),
        lang=language))

  def translation(name: str, train: Sequence[tuple[str, str]]):
    memory_tasks.seq2seq_task(name, vocabulary, _translation_split_rows(pairs, train, shots),
                              [text_metrics.chrf, text_metrics.bleu], first_line)
  translation(f'{prefix}bible_nya_en', pairs['dc'])
  translation(f'{prefix}bible_nya_en_slice', pairs['slice'])
  for mixture in ('bible_anchor', 'bible_dc'):
    memory_tasks.replace_mixture(prefix + mixture, {
        prefix + task_name: rate for task_name, rate in mixture_rates(mixture, rates).items()})
  memory_tasks.replace_mixture(prefix + 'bible_eval', {f'{prefix}bible_nya_en': 1.0,
                                                       f'{prefix}bible_en_lm': 1.0})
  return prefix + task


def _translation_split_rows(pairs: dict[str, tuple[tuple[str, str], ...]],
                            train: Sequence[tuple[str, str]], shots: int):
  """rows(split) of a nya->en task: `train` for 'train', the held-out books otherwise."""
  def rows(split: str):
    if split == 'train':
      return translation_rows(train, pairs['dc'], shots, 'nya', 'en',
                              pool_is_pairs=train is pairs['dc'])
    return translation_rows(pairs['held_out'], pairs['dc'], shots, 'nya', 'en')
  return functools.lru_cache(maxsize=2)(rows)


ALIGNED_NAMES = ('bible_en_lm', 'bible_nya_en', 'bible_dc')


def register_bible_aligned(vocabulary_path: str | None, augment_vocabulary_path: str, *,
                           shots: int = 0, dc_share: float = DC_SHARE,
                           rates: dict[str, dict[str, float]] | None = None,
                           prefix: str = 'aligned_') -> str:
  """Registers the Bible tasks a composition reads when its augment has its own tokenizer
  (`memory_tasks.aligned_seq2seq_task`: the anchor's features in `vocabulary_path`'s
  vocabulary, the augment's stream in `augment_vocabulary_path`'s); returns `prefix +
  'bible_dc'`.

  Registered: `{prefix}bible_en_lm`, `{prefix}bible_nya_en` (D_C and the held-out books, as
  `register_bible`'s) and the mixture `{prefix}bible_dc` (its rates).

  Args:
    vocabulary_path: the anchor's vocabulary (as `register_bible` takes it).
    augment_vocabulary_path: the augment's own SentencePiece model or LM checkpoint.
    shots, dc_share, rates: as `register_bible`'s.
    prefix: prepended to every name (not empty: the plain tasks keep theirs).
  """
  if not prefix:
    raise ValueError('register_bible_aligned needs a prefix: the plain Bible tasks keep their '
                     'names.')
  vocabulary = bible_vocabulary(vocabulary_path)
  augment_vocabulary = bible_vocabulary(augment_vocabulary_path)
  pairs = bible_splits(dc_share)
  memory_tasks.aligned_seq2seq_task(
      f'{prefix}bible_en_lm', vocabulary, augment_vocabulary,
      lambda split: [{'inputs': '', 'targets': t} for t in bible_data.monolingual(
          'en', held_out=split == 'validation')])
  memory_tasks.aligned_seq2seq_task(
      f'{prefix}bible_nya_en', vocabulary, augment_vocabulary,
      _translation_split_rows(pairs, pairs['dc'], shots),
      [text_metrics.chrf, text_metrics.bleu], first_line)
  memory_tasks.replace_mixture(prefix + 'bible_dc', {
      prefix + task_name: rate for task_name, rate in mixture_rates('bible_dc', rates).items()})
  return prefix + 'bible_dc'


def register_flores(root: str, language: str, *, vocabulary_path: str, shots: int = 5,
                    target: str = 'eng_Latn', name: str | None = None, seed: int = 0) -> str:
  """Registers FLORES-200 `language`->`target` translation; returns its name
  (default `flores_<language>_en`).

  Its 'validation' split is 'devtest' with k-shot prompts drawn from 'dev'; its 'train' split
  is 'dev' with shots from 'dev' (never the example itself). Metrics: chrF1, BLEU.
  `vocabulary_path`: an LM checkpoint carrying its vocabulary, or a SentencePiece `.model`.

  Raises:
    FileNotFoundError, lowres_formats.FormatError: a missing or malformed file (checked here).
  """
  name = name or f'flores_{language}_en'
  dev = lowres_formats.read_flores(root, language, target, 'dev')
  devtest = lowres_formats.read_flores(root, language, target, 'devtest')

  def rows(split: str):
    if split == 'train':
      return translation_rows(dev, dev, shots, language, target, seed, pool_is_pairs=True)
    return translation_rows(devtest, dev, shots, language, target, seed)
  memory_tasks.seq2seq_task(name, text_lm.vocabulary(vocabulary_path),
                            functools.lru_cache(maxsize=2)(rows),
                            [text_metrics.chrf, text_metrics.bleu], first_line)
  return name


def register_math(name: str, eval_file: str, *, vocabulary_path: str,
                  train_file: str | None = None, shots: int = 8, seed: int = 0) -> str:
  """Registers a math word-problem task: `eval_file` (GSM8K `.jsonl` or MGSM `.tsv`) is its
  'validation' split, with k-shot chains from GSM8K `train_file` (default: `eval_file`'s own
  problems, never the example itself); 'train' is `train_file`'s problems. Metric: exact match
  of the final number. `vocabulary_path`: as `register_flores`'s.

  Raises:
    FileNotFoundError, lowres_formats.FormatError: a missing or malformed file.
    ValueError: shots without a file of chains, or an unknown extension.
  """
  def read(path: str):
    if path.endswith('.jsonl'):
      return lowres_formats.read_gsm8k(path)
    if path.endswith('.tsv'):
      return lowres_formats.read_mgsm(path)
    raise ValueError(f'{path}: expected a GSM8K .jsonl or an MGSM .tsv file.')
  evaluation = read(eval_file)
  train = read(train_file) if train_file else evaluation
  if shots and not all(p.chain for p in train):
    raise ValueError(f'{train_file or eval_file} has no worked chains for {shots}-shot '
                     'prompts: give a GSM8K train_file.')

  def rows(split: str):
    problems = train if split == 'train' else evaluation
    own = problems is train
    out = []
    for i, p in enumerate(problems):
      chosen = lowres_formats.shot_indices(len(train), shots, i, seed,
                                           exclude=i if own else None)
      out.append({'inputs': lowres_formats.math_prompt(p.question, [train[j] for j in chosen]),
                  'targets': lowres_formats.math_target(p)})
    return out
  memory_tasks.seq2seq_task(name, text_lm.vocabulary(vocabulary_path),
                            functools.lru_cache(maxsize=2)(rows),
                            [text_metrics.final_number_accuracy])
  return name
