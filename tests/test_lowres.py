"""The low-resource-language tasks: Bible data and held-out books, published layouts, k-shot
prompts, metrics (calm_tasks.bible_data, lowres_formats, lowres, text_metrics)."""

import json

import numpy as np
import pytest
import sacrebleu
import seqio

from calm_tasks import bible_data, lowres, lowres_formats, text_metrics


@pytest.fixture(scope='module')
def bible(tmp_path_factory):
  """The Bible tasks registered under 'test_' with a small vocabulary trained for the test."""
  path = str(tmp_path_factory.mktemp('bible') / 'spm.model')
  lowres.bible_vocabulary(path, vocab_size=1000)
  name = lowres.register_bible(path, shots=2, prefix='test_')
  return {'vocabulary': path, 'name': name}


def _raw(task_name, split):
  """The task's source examples (text, before tokenization)."""
  task = seqio.get_mixture_or_task(task_name)
  return [{k: v.decode() for k, v in ex.items()}
          for ex in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator()]


def test_the_bibles_align_verse_by_verse():
  verses = bible_data.verses()
  assert len(verses) == 31_104
  assert len({v.book for v in verses}) == 66
  genesis = verses[0]
  assert genesis.citation == 'Genesis 1:1' and genesis.en.startswith('In the beginning God')
  assert genesis.nya.startswith('Pachiyambi Mulungu adalenga')
  # Revelation 12 differs by a verse: none of it is parallel, all of it monolingual.
  rev12 = [v for v in verses if v.book == 'Revelation' and v.chapter == 12]
  assert len(rev12) == 18 and rev12[-1].en is None
  assert not [v for v in bible_data.parallel(False) if v.book == 'Revelation' and v.chapter == 12]
  held_out = bible_data.parallel(True)
  assert {v.book for v in held_out} == set(bible_data.HELD_OUT_BOOKS) and len(held_out) == 345


def test_no_held_out_verse_is_in_any_training_task(bible):
  """Text of the held-out books (in either language; text that also occurs in a training book
  aside) appears in no 'train' example of any Bible task, shots included; validation prompts
  take their shots from D_C only."""
  # From the verses and the book names alone, not from the functions the tasks use.
  def text_of(books_held_out):
    return {t for v in bible_data.verses()
            if (v.book in bible_data.HELD_OUT_BOOKS) == books_held_out
            for t in (v.nya, v.en) if t is not None}
  held_out = text_of(True) - text_of(False)
  assert len(held_out) > 600
  for task in ('bible_nya_lm', 'bible_en_lm', 'bible_nya_en', 'bible_nya_en_slice'):
    for example in _raw('test_' + task, 'train'):
      for text in example.values():
        assert text not in held_out
        if len(text) > 200 or '\n' in text:  # A prompt: no held-out verse inside it.
          assert not any(verse in text for verse in held_out), task
  dc = {s for s, _ in lowres.bible_splits()['dc']}
  for example in _raw('test_bible_nya_en', 'validation')[:50]:
    shots = [line[len('Chichewa: '):] for line in example['inputs'].split('\n')
             if line.startswith('Chichewa: ')]
    assert len(shots) == 3 and all(s in dc for s in shots[:-1]), shots
  # The held-out LM split is exactly the held-out books.
  assert [e['targets'] for e in _raw('test_bible_en_lm', 'validation')] == list(
      bible_data.monolingual('en', held_out=True))


def test_dc_and_the_anchor_slice_are_small_and_disjoint():
  pairs = lowres.bible_splits()
  train_pairs = len(bible_data.parallel(False))
  assert 0.04 < len(pairs['dc']) / train_pairs < 0.06
  assert 0.005 < len(pairs['slice']) / train_pairs < 0.015
  assert not set(pairs['dc']) & set(pairs['slice'])
  assert pairs == lowres.bible_splits()  # Deterministic.


def test_mixtures_have_the_default_rates_and_gin_can_set_them(bible):
  mixture = seqio.get_mixture_or_task('test_bible_dc')
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      'test_bible_nya_en': 0.8, 'test_bible_en_lm': 0.2}
  lowres.register_bible(bible['vocabulary'], prefix='test2_',
                        rates={'bible_dc': {'bible_nya_en': 1.0}})
  mixture = seqio.get_mixture_or_task('test2_bible_dc')
  assert [t.name for t in mixture.tasks] == ['test2_bible_nya_en']
  with pytest.raises(ValueError, match="Unknown Bible task or mixture 'nope'"):
    lowres.register_bible(bible['vocabulary'], task='nope', prefix='test3_')


def test_translation_task_tokenizes_and_scores_with_chrf_and_bleu(bible):
  task = seqio.get_mixture_or_task('test_bible_nya_en')
  assert [f.__name__ for f in task.metric_fns] == ['chrf', 'bleu']
  example = next(task.get_dataset({'inputs': 512, 'targets': 128}, split='validation',
                                  shuffle=False).as_numpy_iterator())
  vocabulary = task.output_features['targets'].vocabulary
  raw = _raw('test_bible_nya_en', 'validation')[0]
  assert example['targets'][-1] == 1  # EOS
  assert vocabulary.decode(example['targets'].tolist()) == raw['targets']
  assert raw['inputs'].endswith('Chichewa: ' + bible_data.parallel(True)[0].nya + '\nEnglish:')


def test_shots_are_deterministic_and_never_the_example_itself():
  for index in range(50):
    chosen = lowres_formats.shot_indices(10, 5, index, seed=3, exclude=index % 10)
    assert chosen == lowres_formats.shot_indices(10, 5, index, seed=3, exclude=index % 10)
    assert len(set(chosen)) == 5 and index % 10 not in chosen
  assert lowres_formats.shot_indices(10, 5, 0, seed=3) != lowres_formats.shot_indices(
      10, 5, 0, seed=4)
  pairs = [(f'source {i}', f'target {i}') for i in range(6)]
  rows = lowres.translation_rows(pairs, pairs, 5, 'nya', 'en', pool_is_pairs=True)
  for (src, _), row in zip(pairs, rows):
    assert row['inputs'].count(src) == 1 and row['inputs'].endswith(f'Chichewa: {src}\nEnglish:')
  with pytest.raises(ValueError, match='6 shots asked from a pool of 5'):
    lowres_formats.shot_indices(6, 6, 0, exclude=0)


@pytest.fixture
def flores_root(tmp_path):
  for split, n in (('dev', 6), ('devtest', 4)):
    (tmp_path / split).mkdir()
    (tmp_path / split / f'nya_Latn.{split}').write_text(
        ''.join(f'Chichewa sentence {i} of {split}\n' for i in range(n)))
    (tmp_path / split / f'eng_Latn.{split}').write_text(
        ''.join(f'English sentence {i} of {split}\n' for i in range(n)))
  return tmp_path


def test_flores_layout_parses_into_a_five_shot_task(flores_root, bible):
  name = lowres.register_flores(str(flores_root), 'nya_Latn', vocabulary_path=bible['vocabulary'])
  assert name == 'flores_nya_Latn_en'
  rows = _raw(name, 'validation')
  assert len(rows) == 4 and rows[2]['targets'] == 'English sentence 2 of devtest'
  prompt = rows[2]['inputs']
  assert prompt.count(' of dev\nEnglish:') == 5 and 'devtest' not in prompt.rsplit('\n', 2)[0]
  assert prompt.endswith('Chichewa: Chichewa sentence 2 of devtest\nEnglish:')
  for row in _raw(name, 'train'):
    source = row['inputs'].rsplit('Chichewa: ', 1)[1]
    assert row['inputs'].count(source) == 1


def test_malformed_flores_files_name_file_and_line(flores_root, bible):
  with open(flores_root / 'devtest' / 'eng_Latn.devtest', 'a') as f:
    f.write('one more\n')
  with pytest.raises(lowres_formats.FormatError, match='has 4 lines but .*eng_Latn.devtest has 5'):
    lowres.register_flores(str(flores_root), 'nya_Latn', vocabulary_path=bible['vocabulary'])
  (flores_root / 'dev' / 'nya_Latn.dev').write_text('a\n\nc\nd\ne\nf\n')
  with pytest.raises(lowres_formats.FormatError, match=r'nya_Latn.dev:2: empty line'):
    lowres_formats.read_flores(flores_root, 'nya_Latn', 'eng_Latn', 'dev')
  with pytest.raises(FileNotFoundError, match='xho_Latn.dev does not exist'):
    lowres_formats.read_flores(flores_root, 'xho_Latn', 'eng_Latn', 'dev')


GSM8K = [
    {'question': 'Ann has 3 apples and buys 4 more. How many?',
     'answer': 'She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7'},
    {'question': 'A box holds 1,200 pens; 200 are sold. How many are left?',
     'answer': '1,200 - 200 = <<1200-200=1000>>1,000\n#### 1,000'},
    {'question': 'Half of 9?', 'answer': '9 / 2 = 4.5\n#### 4.5'},
]


def test_gsm8k_and_mgsm_layouts_parse_into_k_shot_tasks(tmp_path, bible):
  train = tmp_path / 'train.jsonl'
  train.write_text(''.join(json.dumps(r) + '\n' for r in GSM8K))
  problems = lowres_formats.read_gsm8k(train)
  assert [p.answer for p in problems] == ['7', '1000', '4.5']
  assert problems[0].chain == 'She has 3 + 4 = 7 apples.'
  mgsm = tmp_path / 'mgsm_sw.tsv'
  mgsm.write_text('Juma ana maembe 5 na anapata 2. Ana mangapi?\t7\nSwali la pili?\t1,024\n')
  assert [p.answer for p in lowres_formats.read_mgsm(mgsm)] == ['7', '1024']
  name = lowres.register_math('mgsm_sw', str(mgsm), train_file=str(train), shots=2,
                              vocabulary_path=bible['vocabulary'])
  rows = _raw(name, 'validation')
  assert rows[0]['inputs'].count('Question: ') == 3 and rows[0]['inputs'].endswith(
      'Question: Juma ana maembe 5 na anapata 2. Ana mangapi?\nAnswer:')
  assert rows[0]['targets'] == 'The answer is 7.'
  assert lowres.register_math('gsm8k', str(train), shots=2,
                              vocabulary_path=bible['vocabulary']) == 'gsm8k'
  for row, problem in zip(_raw('gsm8k', 'validation'), problems):
    assert problem.question not in row['inputs'].rsplit('Question: ', 1)[0]
  with pytest.raises(ValueError, match='no worked chains for 2-shot'):
    lowres.register_math('bad', str(mgsm), shots=2, vocabulary_path=bible['vocabulary'])


@pytest.mark.parametrize('line,message', [
    ('not json', r'bad.jsonl:2: expected JSON with "question" and "answer"'),
    ('{"question": "q", "answer": "no final number"}', r'bad.jsonl:2: the answer does not end'),
])
def test_malformed_gsm8k_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / 'bad.jsonl'
  path.write_text(json.dumps(GSM8K[0]) + '\n' + line + '\n')
  with pytest.raises(lowres_formats.FormatError, match=message):
    lowres_formats.read_gsm8k(path)


def test_malformed_mgsm_line_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.tsv'
  path.write_text('q\t3\nq without answer\n')
  with pytest.raises(lowres_formats.FormatError, match=r'bad.tsv:2: expected "question<TAB>'):
    lowres_formats.read_mgsm(path)


def _chrf_by_hand(hypotheses, references, beta, order=6):
  """chrF from its definition (Popović 2015): character n-gram precision and recall (whitespace
  removed, statistics summed over the corpus) averaged over n = 1..6, then their F-beta."""
  def ngrams(text, n):
    text = ''.join(text.split())
    grams = {}
    for i in range(len(text) - n + 1):
      grams[text[i:i + n]] = grams.get(text[i:i + n], 0) + 1
    return grams
  precisions, recalls = [], []
  for n in range(1, order + 1):
    match = hyp = ref = 0
    for h, r in zip(hypotheses, references):
      hg, rg = ngrams(h, n), ngrams(r, n)
      match += sum(min(c, rg.get(g, 0)) for g, c in hg.items())
      hyp, ref = hyp + sum(hg.values()), ref + sum(rg.values())
    precisions.append(match / hyp)
    recalls.append(match / ref)
  p, r = np.mean(precisions), np.mean(recalls)
  return 100 * float((1 + beta**2) * p * r / (beta**2 * p + r))


def test_chrf_is_chrf1_and_equals_sacrebleu_and_its_definition():
  references = ['In the beginning God created the heaven and the earth.',
                'And God said, Let there be light: and there was light.',
                'Jesus wept.']
  hypotheses = ['In the beginning God made heaven and earth.',
                'God said let there be light and light was.', 'Jesus wept']
  ours = text_metrics.chrf(references, hypotheses)['chrf']
  assert ours == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references], beta=1).score,
                               abs=1e-9)
  assert ours == pytest.approx(_chrf_by_hand(hypotheses, references, beta=1), abs=1e-6)
  # Beta 1, not sacrebleu's default 2 (which weighs recall more: a short hypothesis scores less).
  chrf2 = sacrebleu.corpus_chrf(hypotheses, [references]).score
  assert chrf2 == pytest.approx(_chrf_by_hand(hypotheses, references, beta=2), abs=1e-6)
  assert abs(ours - chrf2) > 0.5
  assert text_metrics.chrf(references, references)['chrf'] == pytest.approx(100.0)
  bleu = text_metrics.bleu(references, hypotheses)['bleu']
  assert bleu == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  assert 0 < bleu < ours


def test_final_number_accuracy():
  targets = ['3 + 4 = 7. The answer is 7.', 'The answer is 1000.', 'The answer is 4.5.']
  predictions = ['so 7', 'The answer is 1,000.', 'The answer is 4.']
  assert text_metrics.final_number_accuracy(targets, predictions) == {
      'final_number_accuracy': pytest.approx(200 / 3)}
  assert lowres_formats.final_number('no number') is None


def test_calm_eval_reports_chrf_and_bleu_of_a_bible_task(bible, tmp_path):
  """The translation task's seqio metrics reach calm-eval's results (a tiny random LM in the
  task's vocabulary decodes 4 held-out prompts)."""
  from calm_jax import checkpoints, eval as eval_lib  # pylint: disable=g-import-not-at-top
  from calm_jax.configs import TransformerConfig  # pylint: disable=g-import-not-at-top
  from calm_jax.random_init import random_like  # pylint: disable=g-import-not-at-top
  from calm_jax.transformer import abstract_params  # pylint: disable=g-import-not-at-top
  config = TransformerConfig(vocab_size=1000, embed_dim=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64)
  checkpoints.save_lm(tmp_path / 'lm', config, random_like(abstract_params(config), seed=0))
  results = eval_lib.evaluate(checkpoint=str(tmp_path / 'lm'),
                              mixture_or_task_name='test_bible_nya_en',
                              task_feature_lengths={'inputs': 96, 'targets': 8}, batch_size=4,
                              num_examples=4, eval_dir=str(tmp_path / 'eval'))
  scores = results['test_bible_nya_en']
  assert set(scores) >= {'chrf', 'bleu'} and 0.0 <= scores['chrf'] < 100.0
