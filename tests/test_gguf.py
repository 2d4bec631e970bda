"""GGUF import (calm_jax.convert.gguf_file, calm_jax.vocab) on tiny files written like llama.cpp's.

Each family's tiny random GGUF (tests/gguf_fixtures.py: quantised Q8_0, Q5_0, Q4_K, Q6_K and
F32 tensors, llama.cpp's q/k permutation and Gemma's `1 + w` norms) is converted to an LM
checkpoint; our Transformer's logits must match those of transformers loading the same file, and
the saved vocabulary must tokenize like transformers' tokenizer of the file. Bad files give one
clear error each.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import checkpoints, vocab
from calm_jax.checkpoints import CheckpointError
from calm_jax.convert import gguf_file
from calm_jax.convert.hf_config import UnsupportedModelError
from calm_jax.transformer import Transformer

pytest.importorskip('gguf', reason='GGUF import needs the gguf package (pip install gguf)')
import gguf_fixtures as fx  # pylint: disable=g-bad-import-order,wrong-import-position

BATCH, LENGTH = 2, 11  # LENGTH > 2 * the Gemma fixtures' window of 4.
TOLERANCE = 1e-5  # max |ours - reference| / max |reference| over the logits.
# Strings of the fixture's pieces, plus characters only byte fallback spells. None starts with a
# space: there transformers' Metaspace adds no dummy prefix where SentencePiece and llama.cpp do.
TEXTS = ('the cat sat on the mat', 'hello world and tabs', 'Hello, wörld! 🙂 ∑ naïve café',
         'double  spaces  here   ', 'tabs\there\nnew line\n\n', 'inning tested ees 1234567890')


def _quiet(_):
  """A log sink that drops progress lines."""


def _transformers():
  """(torch, transformers), or a skip naming what is missing."""
  torch = pytest.importorskip('torch', reason='the parity tests need torch')
  transformers = pytest.importorskip('transformers', reason='the parity tests need transformers')
  pytest.importorskip('accelerate', reason='transformers needs accelerate to load GGUF files')
  return torch, transformers


@pytest.fixture(scope='module')
def tokens():
  # Avoid the control and unknown ids (0..3).
  return np.random.default_rng(0).integers(4, fx.VOCAB, (BATCH, LENGTH)).astype(np.int32)


@pytest.fixture(scope='module')
def gguf_dir(tmp_path_factory):
  """A directory holding `<family>.gguf` for every fixture family."""
  root = tmp_path_factory.mktemp('gguf')
  for family in fx.FAMILIES:
    fx.write_gguf(root / f'{family}.gguf', family)
  return root


@pytest.fixture(scope='module')
def converted(gguf_dir, tmp_path_factory):
  """`converted(family)`: the LM checkpoint directory converted from the family's file."""
  out = tmp_path_factory.mktemp('lm')
  done = {}

  def convert(family):
    if family not in done:
      gguf_file.convert_gguf_file(str(gguf_dir / f'{family}.gguf'), str(out / family), log=_quiet)
      done[family] = str(out / family)
    return done[family]
  return convert


@pytest.fixture(scope='module')
def reference_logits(gguf_dir, tokens):
  """`reference_logits(family)`: transformers' logits for `tokens` from the family's file."""
  torch, transformers = _transformers()
  done = {}

  def logits(family):
    if family not in done:
      model = transformers.AutoModelForCausalLM.from_pretrained(
          str(gguf_dir), gguf_file=f'{family}.gguf', dtype=torch.float32,
          attn_implementation='eager')
      with torch.no_grad():
        done[family] = model.eval()(input_ids=torch.as_tensor(tokens, dtype=torch.long)
                                    ).logits.numpy()
    return done[family]
  return logits


def _logits(config, params, tokens):
  return np.asarray(Transformer(config).apply({'params': params}, jnp.asarray(tokens)).logits)


def _relative_error(ours, reference):
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_fixtures_cover_every_quantisation_type(gguf_dir):
  """The families together store tensors of each type the parity tests are meant to cover."""
  kinds = set()
  for family in fx.FAMILIES:
    f = gguf_file.GGUFFile(gguf_dir / f'{family}.gguf')
    kinds |= {f.tensor_type(name) for name in f.tensors}
  assert kinds == {'F32', 'Q8_0', 'Q5_0', 'Q4_K', 'Q6_K'}


@pytest.mark.parametrize('family', list(fx.FAMILIES))
def test_logits_match_transformers(family, converted, reference_logits, tokens):
  reference = reference_logits(family)
  config, params = checkpoints.load_lm(converted(family))
  assert config.param_dtype == 'float32'
  assert config.vocab_size == fx.vocab_size(family)
  assert config.num_layers == fx.FAMILIES[family].layers
  assert _relative_error(_logits(config, params, tokens), reference) <= TOLERANCE


def test_unpermuted_qk_is_caught(gguf_dir, reference_logits, tokens):
  """Negative control: reading the llama file's q/k rows as stored moves the logits far away."""
  reference = reference_logits('llama')
  f = gguf_file.GGUFFile(gguf_dir / 'llama.gguf')
  config = gguf_file.config_from_gguf(f)
  right = gguf_file.load_gguf_params(f, config)
  wrong = gguf_file.load_gguf_params(f, config, permute=lambda w, heads: w)
  assert _relative_error(_logits(config, right, tokens), reference) <= TOLERANCE
  assert _relative_error(_logits(config, wrong, tokens), reference) > 100 * TOLERANCE


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(2 * 3 * 16 * 5, dtype=np.float32).reshape(2 * 3 * 16, 5)
  np.testing.assert_array_equal(gguf_file.unpermute_qk(fx.permute_qk(w, 6), 6), w)
  assert not np.array_equal(fx.permute_qk(w, 6), w)


@pytest.mark.parametrize('family,extra', [('llama', ()), ('gemma3', ('  leading spaces',))])
def test_vocabulary_matches_transformers_tokenizer(family, extra, gguf_dir, converted):
  """The saved SentencePiece vocabulary gives transformers' ids (Llama's dummy prefix, Gemma's
  none and its pieces of spaces stored as real spaces) and decodes back to the text."""
  _, transformers = _transformers()
  ours = vocab.load_vocabulary(converted(family))
  theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=f'{family}.gguf')
  assert ours.vocab_size == fx.VOCAB
  for text in TEXTS + extra:
    ids = [int(i) for i in ours.encode(text)]
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  # Byte fallback was exercised: 'ö' has no piece of its own, so it is its UTF-8 bytes' pieces.
  assert [int(i) for i in ours.encode('ö')][-2:] == [4 + 0xC3, 4 + 0xB6]


BPE_TEXTS = TEXTS + ("it's 12345 naïve 7", '  leading spaces', 'Hello\r\n\r\nworld  ',
                     'the<think>cat sat')


@pytest.fixture(scope='module')
def llama3_file(tmp_path_factory):
  """A llama file with Llama 3's byte-level BPE tokenizer (pre-tokenizer 'llama-bpe')."""
  return fx.write_gguf(tmp_path_factory.mktemp('llama3') / 'llama3.gguf', 'llama',
                       bpe='llama-bpe')


@pytest.mark.parametrize('family', ['qwen2', 'llama3'])
def test_byte_level_bpe_vocabulary_matches_transformers_tokenizer(family, gguf_dir, converted,
                                                                  llama3_file, tmp_path):
  """A byte-level BPE GGUF tokenizer (Qwen's split: one digit at a time; Llama 3's: up to three)
  saved as vocab.bpe.json gives transformers' ids, keeps control and user-defined tokens whole
  and decodes back to the text; id 0 ('!') is a token."""
  _, transformers = _transformers()
  if family == 'llama3':
    checkpoint = str(tmp_path / 'lm')
    gguf_file.convert_gguf_file(llama3_file, checkpoint, log=_quiet)
    directory, name = os.path.split(llama3_file)
  else:
    checkpoint, directory, name = converted(family), str(gguf_dir), f'{family}.gguf'
  assert os.path.exists(os.path.join(checkpoint, vocab.BPE_FILE))
  assert not os.path.exists(os.path.join(checkpoint, vocab.VOCAB_FILE))
  ours = vocab.load_vocabulary(checkpoint)
  theirs = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  assert ours.vocab_size == fx.BPE_VOCAB
  tokens = fx.bpe_tokenizer()[0]
  for text in BPE_TEXTS:
    ids = [int(i) for i in ours.encode(text)]
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  digits = [tokens[i] for i in ours.encode('12345')]
  assert digits == (['123', '45'] if family == 'llama3' else ['1', '2', '3', '4', '5'])
  assert [tokens[i] for i in ours.encode('the<think>')] == ['the', '<think>']
  assert ours.encode('!') == [0] and ours.decode([0, 0]) == '!!'
  chat = '<|im_start|>the cat<|im_end|>'
  ids = [int(i) for i in ours.encode(chat)]
  assert ids == theirs.encode(chat, add_special_tokens=False)
  assert ids[0] == tokens.index('<|im_start|>') and ids[-1] == ours.eos_id
  assert ours.decode(ids[:-1]) == 'the cat'  # Control tokens decode to nothing.
  assert ours.pad_id == ours.bos_id == tokens.index('<|endoftext|>') and not ours.add_bos


def test_byte_level_bpe_vocabulary_in_tf_generation_and_export(converted, tmp_path):
  """The BPE vocabulary's TF ops (what seqio tasks run) equal its Python ones; calm-generate
  reads no BOS for it (the file says Qwen adds none) and keeps id 0; a composed export carries
  it as a file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from calm_jax import composed, generate  # pylint: disable=g-import-not-at-top
  checkpoint = converted('qwen2')
  ours = vocab.load_vocabulary(checkpoint)
  texts = ['the cat! 12', "it's naïve"]
  ids = [list(ours.encode(t)) for t in texts]
  assert [ours.encode_tf(tf.constant(t)).numpy().tolist() for t in texts] == ids
  width = max(map(len, ids)) + 2
  batch = np.zeros((2, width), np.int32)  # T5X pads with 0 ('!' here) after EOS.
  for row, row_ids in enumerate(ids):
    batch[row, :len(row_ids) + 1] = row_ids + [ours.eos_id]
  assert [t.decode() for t in ours.decode_tf(tf.constant(batch)).numpy()] == texts
  generator = generate.TextGenerator(checkpoint, max_decode_len=4)
  assert generator.bos_id is None and generator.encode('!the') == [0] + ids[0][:1]
  [completion] = generator.generate(['the cat'])
  until_eos = completion.tokens[:completion.tokens.index(ours.eos_id)] if (
      ours.eos_id in completion.tokens) else completion.tokens
  assert completion.text == ours.decode(until_eos)
  reference = composed.vocabulary_reference(ours, tmp_path)
  assert reference['type'] == 'byte_level_bpe'
  again = composed.load_vocabulary(reference, tmp_path)
  assert again == ours and [list(again.encode(t)) for t in texts] == ids


class _Metadata:
  """The metadata of a GGUF file, without the file."""

  def __init__(self, **fields):
    self.path, self._fields = 'metadata', {f'tokenizer.ggml.{k}': v for k, v in fields.items()}

  def get(self, key, default=None):
    return self._fields.get(key, default)


@pytest.mark.parametrize('pre,expected', [('llama-bpe', ['abc']), ('qwen2', ['a', 'bc'])])
def test_llama3_takes_a_whole_word_before_merges(pre, expected, tmp_path):
  """Llama 3's tokenizer (as llama.cpp and tiktoken run it) takes a split that is a token
  whole; others apply merges by priority ('b c' first, and there is no 'a bc')."""
  from calm_jax import bpe  # pylint: disable=g-import-not-at-top
  tokens = ['a', 'b', 'c', 'bc', 'ab', 'abc', '<eos>']
  document = bpe.document_from_gguf(_Metadata(
      model='gpt2', pre=pre, tokens=tokens, token_type=[1] * 6 + [3], merges=['b c', 'a b'],
      eos_token_id=6))
  (tmp_path / 'v.json').write_text(json.dumps(document))
  vocabulary = bpe.ByteLevelBPEVocabulary(tmp_path / 'v.json')
  assert [tokens[i] for i in vocabulary.encode('abc')] == expected
  assert vocabulary.decode(vocabulary.encode('abc')) == 'abc'


@pytest.mark.parametrize('fields,message', [
    ({'merges': []}, 'lists no merges'),
    ({'pre': 'unknown-pre'}, "unknown pre-tokenizer 'unknown-pre'"),
    ({'eos_token_id': 99}, 'eos_token_id = 99 is not a token id'),
    ({'merges': ['ab']}, "malformed merge 'ab'"),
    ({'tokens': ['a', 'b', 'a']}, "token 'a' \\(id 2\\) occurs twice"),
])
def test_bad_byte_level_bpe_tokenizer(fields, message):
  from calm_jax import bpe  # pylint: disable=g-import-not-at-top
  good = dict(model='gpt2', pre='qwen2', tokens=['a', 'b', 'ab'], token_type=[1, 1, 3],
              merges=['a b'], eos_token_id=2)
  with pytest.raises(CheckpointError, match=message):
    bpe.document_from_gguf(_Metadata(**dict(good, **fields)), error=CheckpointError)


# Bad input: one clear error each.


@pytest.fixture(scope='module')
def llama_file(gguf_dir):
  return gguf_dir / 'llama.gguf'


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match='nowhere.gguf does not exist'):
    gguf_file.convert_gguf_file(str(tmp_path / 'nowhere.gguf'), str(tmp_path / 'out'),
                                log=_quiet)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / 'model.gguf'
  path.write_text('{"model_type": "llama"}\n' * 100)
  with pytest.raises(CheckpointError, match='not a readable GGUF file'):
    gguf_file.GGUFFile(path)


def test_truncated_file(llama_file, tmp_path):
  data = llama_file.read_bytes()
  path = tmp_path / 'half.gguf'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='truncated'):
    gguf_file.convert_gguf_file(str(path), str(tmp_path / 'out'), log=_quiet)
  assert not (tmp_path / 'out').exists()


def test_unknown_architecture(tmp_path):
  path = fx.write_gguf(tmp_path / 'mamba.gguf', 'llama', arch='mamba')
  with pytest.raises(UnsupportedModelError, match="Unsupported GGUF architecture 'mamba'"):
    gguf_file.convert_gguf_file(path, str(tmp_path / 'out'), log=_quiet)
  assert not (tmp_path / 'out').exists()


def test_unsupported_quantisation_type(tmp_path):
  path = fx.write_gguf(tmp_path / 'iq4.gguf', 'llama', types={'ffn_gate': fx.Q.IQ4_NL})
  with pytest.raises(UnsupportedModelError, match='unsupported type.*IQ4_NL'):
    gguf_file.convert_gguf_file(path, str(tmp_path / 'out'), log=_quiet)
  assert not (tmp_path / 'out').exists()


def test_missing_tokenizer(tmp_path):
  path = fx.write_gguf(tmp_path / 'no_tokenizer.gguf', 'llama', tokenizer=False)
  with pytest.raises(CheckpointError, match='holds no tokenizer'):
    gguf_file.convert_gguf_file(path, str(tmp_path / 'out'), log=_quiet)
  assert not (tmp_path / 'out').exists()
  # The weights alone still convert.
  gguf_file.convert_gguf_file(path, str(tmp_path / 'weights'), tokenizer=False, log=_quiet)
  assert not vocab.has_vocabulary(tmp_path / 'weights')
  assert os.path.exists(tmp_path / 'weights')


def test_calm_convert_command_reads_gguf_and_names_bad_input(llama_file, repo_root, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS='cpu')

  def convert(*flags):
    return subprocess.run([sys.executable, '-m', 'calm_jax.convert', *flags],
                          capture_output=True, text=True, timeout=300, env=env, check=False)

  out = tmp_path / 'lm'
  result = convert(f'--gguf_file={llama_file}', f'--output_dir={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'wrote the tokenizer' in result.stderr and vocab.has_vocabulary(out)
  assert checkpoints.load_lm_config(out).num_layers == 2
  again = convert(f'--gguf_file={llama_file}', f'--output_dir={out}')
  assert again.returncode != 0 and 'already holds a checkpoint' in again.stderr
  both = convert(f'--gguf_file={llama_file}', f'--hf_dir={tmp_path}', f'--output_dir={out}2')
  assert both.returncode != 0 and 'hf_dir' in both.stderr
