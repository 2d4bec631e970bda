"""The code domain's formats, pass@k and tasks (calm_tasks.code_formats, code_metrics, code):
published layouts parse and malformed files fail naming file and line; pass@k equals its
closed form; HumanEval and MBPP score through seqio's Evaluator, with per-problem results."""

import itertools
import json
import math

import pytest
import sacrebleu
import seqio

from calm_jax import eval as eval_lib
from calm_tasks import code, code_formats, code_metrics, text_metrics

BYTES = seqio.ByteVocabulary()  # Keeps code's whitespace exactly.


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


@pytest.mark.parametrize('n, c, k, expected', [
    (5, 0, 1, 0.0), (5, 5, 1, 1.0), (5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10),
    (10, 3, 5, 1 - 21 / 252), (1, 1, 1, 1.0), (200, 1, 100, 0.5), (4, 2, 3, 1.0)])
def test_pass_at_k_by_hand(n, c, k, expected):
  assert code_metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_binomial_ratio_and_refuses_k_over_n():
  for n, c, k in itertools.product(range(1, 12), range(0, 12), range(1, 12)):
    if c <= n and k <= n:
      closed = 1 - math.comb(n - c, k) / math.comb(n, k)
      assert code_metrics.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
  # Large n: the product form does not overflow where binomials of floats would.
  assert 0 < code_metrics.pass_at_k(2000, 3, 10) < 1
  assert code_metrics.mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(20.0)
  with pytest.raises(ValueError, match='k <= n'):
    code_metrics.pass_at_k(3, 1, 4)
  with pytest.raises(ValueError):
    code_metrics.pass_at_k(3, 4, 1)


def test_humaneval_ships_164_problems_and_its_stops_cut_completions():
  problems = code_formats.humaneval_problems()
  assert len(problems) == 164 and list(problems)[0] == 'HumanEval/0'
  body = '    return 1\n\ndef other():\n    pass\n'
  assert code_formats.truncate_at(body, code_formats.HUMANEVAL_STOPS) == '    return 1\n'
  assert code_formats.truncate_at('x', code_formats.HUMANEVAL_STOPS) == 'x'


def test_malformed_files_name_file_and_line(tmp_path):
  good = {'task_id': 2, 'text': 't', 'code': 'c', 'test_list': ['assert 1']}
  bad = tmp_path / 'mbpp.jsonl'
  bad.write_text(json.dumps(good) + '\n\n{not json\n')
  with pytest.raises(code_formats.FormatError, match=r'mbpp.jsonl:3: not JSON'):
    code_formats.read_mbpp(bad)
  _write_jsonl(bad, [good, {**good, 'test_list': 'assert 1'}])
  with pytest.raises(code_formats.FormatError, match=r'mbpp.jsonl:2: test_list'):
    code_formats.read_mbpp(bad)
  glue = _write_jsonl(tmp_path / 'c2t.jsonl', [{'code_tokens': ['a']}])
  with pytest.raises(code_formats.FormatError, match=r'c2t.jsonl:1: missing docstring_tokens'):
    code_formats.read_codexglue(glue)
  he = _write_jsonl(tmp_path / 'he.jsonl', [{'task_id': 'x', 'prompt': 'p'}])
  with pytest.raises(code_formats.FormatError, match=r'he.jsonl:1: missing canonical_solution'):
    code_formats.read_humaneval(he)
  with pytest.raises(FileNotFoundError):
    code_formats.read_mbpp(tmp_path / 'absent.jsonl')


def _mbpp_file(tmp_path):
  records = []
  for i in (2, 3, 4, 11, 12, 600):
    records.append({'task_id': i, 'text': f'Write a function f{i} returning {i}.',
                    'code': f'def f{i}():\n  return {i}',
                    'test_list': [f'assert f{i}() == {i}'], 'test_setup_code': ''})
  return _write_jsonl(tmp_path / 'mbpp.jsonl', records)


def test_mbpp_prompts_are_3_shot_and_exclude_the_evaluated_problem(tmp_path):
  problems = {p.task_id: p for p in code_formats.read_mbpp(_mbpp_file(tmp_path))}
  prompt = code_formats.mbpp_prompt(problems[11], [problems[i] for i in (2, 3, 4)])
  assert prompt.count('[BEGIN]') == 4 and prompt.count('[DONE]') == 3
  assert prompt.endswith('assert f11() == 11\n[BEGIN]\n') and 'return 11' not in prompt
  assert prompt.startswith('You are an expert Python programmer, and here is your task: '
                           'Write a function f2 returning 2. Your code should pass these '
                           'tests:\n\nassert f2() == 2\n[BEGIN]\ndef f2():\n  return 2\n'
                           '[DONE]\n')


def _evaluate(task, predictions_for, tmp_path, lengths):
  """seqio's Evaluator over `task` with a predict_fn that writes predictions_for(i) (text)."""
  evaluator, _ = eval_lib.make_evaluator(task, lengths, 'validation', None, tmp_path / 'eval')

  def predict_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for i, _ in dataset.as_numpy_iterator():
      ids = BYTES.encode(predictions_for(int(i)))
      out.append((int(i), ids + [0] * (lengths['targets'] - len(ids))))  # Padded, as decoded.
    return out
  metrics, _ = evaluator.evaluate(compute_metrics=True, step=7, predict_fn=predict_fn)
  return eval_lib.metric_values(metrics)[task]


def test_humaneval_scores_through_seqio_with_per_problem_results(tmp_path):
  name = code.register_humaneval(BYTES, name='test_humaneval')
  problems = list(code_formats.humaneval_problems().values())
  # Even problems get their canonical body, followed by text a model might go on to write
  # (cut at the stop sequence); odd ones the empty body.
  def prediction(i):
    if i % 2:
      return code_formats.STUB_BODY
    tail = '\n\nif __name__ == "__main__":\n  raise SystemExit(1)\n'
    return problems[i]['canonical_solution'] + tail
  scores = _evaluate(name, prediction, tmp_path, {'inputs': 2048, 'targets': 2048})
  assert scores == {'pass@1': pytest.approx(50.0)}
  results = [json.loads(line) for line in
             (tmp_path / 'eval' / f'{name}-000007-results.jsonl').read_text().splitlines()]
  assert len(results) == 164
  assert [r['id'] for r in results] == [p['task_id'] for p in problems]
  assert [r['passed'] for r in results] == [i % 2 == 0 for i in range(164)]
  assert (tmp_path / 'eval' / f'{name}-000007.jsonl').exists()  # The predictions beside them.


def test_mbpp_scores_through_seqio(tmp_path):
  name = code.register_mbpp(str(_mbpp_file(tmp_path)), vocabulary_path=BYTES, name='test_mbpp')
  # Evaluated: problems 11 and 12 (600 trains; 2-4 are the shots).
  answers = {0: 'def f11():\n  return 11\n[DONE]\nmore text', 1: 'def f12():\n  return 0'}
  scores = _evaluate(name, answers.__getitem__, tmp_path, {'inputs': 1024, 'targets': 256})
  assert scores == {'pass@1': pytest.approx(50.0)}
  train = list(seqio.get_mixture_or_task(name).source.get_dataset('train').as_numpy_iterator())
  assert [int(r['id']) for r in train] == [600]


def test_code_to_text_scores_chrf_as_sacrebleu(tmp_path):
  records = [{'code_tokens': ['def', f'f{i}', '(', ')', ':', 'pass'],
              'docstring_tokens': ['Returns', 'nothing', str(i)]} for i in range(6)]
  name = code.register_code_to_text(str(_write_jsonl(tmp_path / 'c2t.jsonl', records)),
                                    vocabulary_path=BYTES, name='test_c2t')
  rows = list(seqio.get_mixture_or_task(name).source.get_dataset(
      'validation').as_numpy_iterator())
  assert all(r['inputs'].decode().count('Summary:') == 4 for r in rows)
  for i, r in enumerate(rows):  # 3 shots, never the example's own summary.
    assert f'Summary: Returns nothing {i}\n' not in r['inputs'].decode()
  guesses = ['Returns nothing', 'Returns something 1', 'nothing', 'Returns nothing 3',
             'x', 'Returns 5']
  scores = _evaluate(name, lambda i: ' ' + guesses[i] + '\nCode:', tmp_path,
                     {'inputs': 512, 'targets': 64})
  refs = [' '.join(r['docstring_tokens']) for r in records]
  expected = sacrebleu.corpus_chrf([' ' + g for g in guesses], [refs], beta=1).score
  assert scores['chrf'] == pytest.approx(expected)
  assert scores['chrf'] == pytest.approx(text_metrics.chrf(refs, [' ' + g for g in guesses])[
      'chrf'])


def test_long_prompts_lose_their_beginning_not_their_cue(tmp_path):
  long_code = ['def', 'f', '(', ')', ':'] + ['x'] * 200
  records = [{'code_tokens': long_code, 'docstring_tokens': ['Returns', 'x', str(i)]}
             for i in range(4)]
  name = code.register_code_to_text(str(_write_jsonl(tmp_path / 'c2t.jsonl', records)),
                                    vocabulary_path=BYTES, name='test_c2t_long', shots=0)
  rows = list(seqio.get_mixture_or_task(name).get_dataset(
      {'inputs': 40, 'targets': 16}, 'validation', shuffle=False).as_numpy_iterator())
  assert all(len(r['inputs']) == 40 for r in rows)
  assert all(BYTES.decode(r['inputs'].tolist()).endswith('x x x\nSummary:') for r in rows)
  # A vocabulary whose models read BOS first keeps it, and one token less of the prompt.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from calm_tasks import memory_tasks  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensors({'inputs': tf.range(10), 'targets': tf.range(3)})
  kept = next(iter(memory_tasks.keep_inputs_end(ds, {'inputs': 4}, reserve=1)))
  assert kept['inputs'].numpy().tolist() == [7, 8, 9]
  assert next(iter(memory_tasks.prepend_bos(memory_tasks.keep_inputs_end(
      ds, {'inputs': 4}, reserve=1), 2)))['inputs'].numpy().tolist() == [2, 7, 8, 9]


def test_a_summary_is_scored_on_its_first_non_empty_line():
  from calm_tasks import code  # pylint: disable=g-import-not-at-top
  assert code.summary_line('\n    Return the key.\n    More.') == 'Return the key.'
  assert code.summary_line('Return it.\nCode:') == 'Return it.'
  assert code.summary_line(b'  \n\n') == ''
