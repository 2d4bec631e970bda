"""The standard-library code corpus (calm_tasks.code_data): deterministic module split, the
held-out modules' code and summaries never in a training text, the mined code->text pairs."""

import ast
import hashlib
import sysconfig

import pytest

from calm_tasks import code_data


@pytest.fixture(scope='module')
def corpus():
  return {'train_chunks': code_data.source_chunks(False),
          'held_out_pairs': code_data.code_text(True),
          'train_pairs': code_data.code_text(False),
          'train_docs': code_data.docstrings(False)}


def test_the_modules_are_the_stdlibs_non_test_python_files():
  modules = dict(code_data.modules())
  assert len(modules) > 400
  assert {'json', 'collections', 'os', 'email.message', 'asyncio.tasks'} <= set(modules)
  root = sysconfig.get_path('stdlib')
  assert all(path.startswith(root) and path.endswith('.py') for path in modules.values())
  assert not [n for n in modules if n.split('.')[-1].startswith('test')
              or n.split('.')[0] in ('idlelib', 'tkinter', 'lib2to3')]


def test_the_split_is_by_top_level_name_and_its_hash():
  names = [n for n, _ in code_data.modules()]
  tops = sorted({n.split('.')[0] for n in names})
  held = {t for t in tops
          if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], 'big') < 0.1 * 2**64}
  assert {n for n in names if code_data.held_out(n)} == {n for n in names
                                                          if n.split('.')[0] in held}
  assert 0.05 < len(held) / len(tops) < 0.15  # About HELD_OUT_SHARE of the top-level names.
  # A package goes whole: the held-out json package has all its modules held out.
  if code_data.held_out('json'):
    assert code_data.held_out('json.decoder') and code_data.held_out('json.encoder')


def test_no_held_out_code_or_summary_is_in_any_training_text(corpus):
  held_sources = [open(p, encoding='utf-8').read() for n, p in code_data.modules()
                  if code_data.held_out(n)]
  # Read again from the files: no training chunk of substance is held-out code.
  long_chunks = [c for c in corpus['train_chunks']
                 if sum(bool(line.strip()) for line in c.splitlines()) >= 8]
  assert len(long_chunks) > 1000
  assert not [c for c in long_chunks if any(c in s for s in held_sources)]
  summaries = {p.text for p in corpus['held_out_pairs']}
  english = ' '.join(corpus['train_docs'])
  assert not [s for s in summaries if s in english]
  train_sources = {p.source.split(':')[0] for p in corpus['train_pairs']}
  assert not [m for m in train_sources if code_data.held_out(m)]


def test_pairs_are_functions_without_their_docstrings(corpus):
  pairs = corpus['held_out_pairs'] + corpus['train_pairs']
  assert len(pairs) > 3000 and len(corpus['held_out_pairs']) > 200
  for pair in pairs[::50]:
    tree = ast.parse(pair.code)  # Dedented: every pair is a parseable function on its own.
    function = tree.body[0]
    assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
    assert ast.get_docstring(function) is None, pair.source
    assert len(pair.text.split()) >= 3 and '\n' not in pair.text
  again = code_data.functions(*next((n, p) for n, p in code_data.modules() if n == 'json'))
  assert again == code_data.functions('json', dict(code_data.modules())['json'])


def test_first_sentence():
  assert code_data.first_sentence('Return the sum.  More text.\n\nDetails.') == 'Return the sum.'
  assert code_data.first_sentence('Split\n  a line\n  in two\n\nDetails.') == 'Split a line in two'
  assert code_data.first_sentence('Use e.g.this one') == 'Use e.g.this one'


@pytest.fixture(scope='module')
def stdlib_tasks():
  """The stdlib tasks registered under 'test_' with the (cached) code vocabulary."""
  from calm_tasks import code  # pylint: disable=g-import-not-at-top
  name = code.register_stdlib(prefix='test_')
  return {'name': name, 'vocabulary': code.code_vocabulary()}


def _rows(name, split):
  import seqio  # pylint: disable=g-import-not-at-top
  return list(seqio.get_mixture_or_task(name).get_dataset(
      split=split, shuffle=False, sequence_length=None).as_numpy_iterator())


def test_the_code_vocabulary_keeps_code_exactly(stdlib_tasks):
  vocabulary = stdlib_tasks['vocabulary']
  held = code_data.code_text(True)
  assert not [p.source for p in held if vocabulary.decode(vocabulary.encode(p.code)) != p.code]
  assert vocabulary.decode(vocabulary.encode('\tx  =  1\n\n  y\n')) == '\tx  =  1\n\n  y\n'


def test_stdlib_tasks_train_on_training_modules_only(stdlib_tasks):
  from calm_tasks import code  # pylint: disable=g-import-not-at-top
  assert stdlib_tasks['name'] == 'test_stdlib_dc'
  dc = code.dc_pairs()
  train_pairs = code_data.code_text(False)
  assert 0.05 < len(dc) / len(train_pairs) < 0.09  # About 7 %.
  held_texts = {p.text for p in code_data.code_text(True)}
  held_code = {p.code for p in code_data.code_text(True)}
  for task in ('test_stdlib_code_to_text', 'test_stdlib_text_to_code'):
    rows = _rows(task, 'train')
    assert len(rows) == len(dc)
    for row in rows:
      text = row['inputs_pretokenized'].decode() + row['targets_pretokenized'].decode()
      assert not any(t in text for t in held_texts if len(t) > 30)
      assert not any(c in text for c in held_code)
  evaluated = _rows('test_stdlib_code_to_text', 'validation')
  assert [r['targets_pretokenized'].decode() for r in evaluated] == [
      p.text for p in code_data.code_text(True)]
  vocabulary = stdlib_tasks['vocabulary']
  lm = _rows('test_stdlib_code_lm', 'train')[:50]
  chunks = code_data.source_chunks(False)[:50]
  assert [vocabulary.decode(r['targets'][:-1].tolist()) for r in lm] == chunks
  with pytest.raises(ValueError, match='Unknown stdlib task'):
    code.register_stdlib(task='stdlib_everything')
