"""calm-generate and the text LM task: a checkpoint's own tokenizer, text in and text out.

A tiny SentencePiece model is trained here (offline, a second) and saved beside a random LM
checkpoint as `vocab.model`, as `calm-convert --gguf_file` does for real models.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from calm_jax import checkpoints, decoding, generate, vocab
from calm_jax.checkpoints import CheckpointError
from calm_jax.configs import TransformerConfig
from calm_jax.random_init import random_like
from calm_jax.transformer import Transformer, abstract_params
from calm_tasks import text_lm

TEXT = ['the cat sat on the mat', 'a dog ran in the park', 'the sun is bright today',
        'birds sing in the morning', 'rain falls on the hills', 'cats and dogs play together',
        'the river runs to the sea', 'children read books at school']


@pytest.fixture(scope='module')
def lm_with_vocab(tmp_path_factory):
  root = tmp_path_factory.mktemp('generate')
  corpus = root / 'corpus.txt'
  corpus.write_text('\n'.join(TEXT * 4) + '\n')
  prefix = str(root / 'sp')
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=60, model_type='bpe',
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=False, minloglevel=2)
  config = TransformerConfig(vocab_size=60, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64)
  params = random_like(abstract_params(config), seed=3)
  lm = root / 'lm'
  checkpoints.save_lm(lm, config, params)
  (lm / vocab.VOCAB_FILE).write_bytes(open(prefix + '.model', 'rb').read())
  return {'lm': str(lm), 'corpus': str(corpus), 'config': config, 'params': params,
          'sp': prefix + '.model', 'root': root}


def test_prompts_start_with_bos_and_greedy_text_matches_uncached_decoding(lm_with_vocab):
  generator = generate.TextGenerator(lm_with_vocab['lm'], max_decode_len=6)
  prompts = ['the cat', 'birds sing in the']
  processor = spm.SentencePieceProcessor(model_file=lm_with_vocab['sp'])
  assert generator.encode(prompts[0]) == [2] + processor.encode(prompts[0])
  done = generator.generate(prompts)
  model = Transformer(lm_with_vocab['config'])
  params = lm_with_vocab['params']
  for prompt, completion in zip(prompts, done):
    ids = generator.encode(prompt)
    tokens = np.zeros((1, len(ids) + 6), np.int32)
    tokens[0, :len(ids)] = ids
    mask = (np.arange(tokens.shape[1]) < len(ids)).astype(np.int32)[None]
    want = decoding.greedy_decode(lambda t: model.apply({'params': params}, t).logits,
                                  jnp.asarray(tokens), jnp.asarray(mask), 6, eos_id=1)
    want = [int(t) for t in np.asarray(want)[0]]
    if 1 in want:  # Up to and including EOS, as the generator reports it.
      want = want[:want.index(1) + 1]
    assert completion.tokens == want, (prompt, completion.tokens, want)
    assert completion.text == generator.decode(want)


def test_streamed_text_adds_up_to_the_completion(lm_with_vocab):
  generator = generate.TextGenerator(lm_with_vocab['lm'], max_decode_len=8)
  pieces = []
  [completion] = generator.generate(['the river'], on_text=lambda row, t: pieces.append(t))
  assert ''.join(pieces) == completion.text


def test_add_bos_false_feeds_the_prompt_alone(lm_with_vocab):
  generator = generate.TextGenerator(lm_with_vocab['lm'], max_decode_len=2, add_bos=False)
  assert generator.encode('the cat')[0] != 2


def test_lm_checkpoint_without_vocabulary_is_a_clear_error(lm_with_vocab, tmp_path):
  config, params = lm_with_vocab['config'], lm_with_vocab['params']
  checkpoints.save_lm(tmp_path / 'bare', config, params)
  with pytest.raises(CheckpointError, match='carries no vocabulary'):
    generate.TextGenerator(str(tmp_path / 'bare'))


def test_read_prompts_from_lines_and_jsonl(tmp_path):
  (tmp_path / 'p.txt').write_text('first\n\nsecond\n')
  (tmp_path / 'p.jsonl').write_text(json.dumps({'prompt': 'third'}) + '\n'
                                    + json.dumps({'inputs': 'fourth'}) + '\n')
  assert generate.read_prompts(['zero'], str(tmp_path / 'p.txt')) == ['zero', 'first', 'second']
  assert generate.read_prompts([], str(tmp_path / 'p.jsonl')) == ['third', 'fourth']
  with pytest.raises(FileNotFoundError, match='does not exist'):
    generate.read_prompts([], str(tmp_path / 'missing.txt'))
  with pytest.raises(ValueError, match='No prompts'):
    generate.read_prompts([], None)
  (tmp_path / 'bad.jsonl').write_text(json.dumps({'text': 'x'}) + '\n')
  with pytest.raises(ValueError, match='bad.jsonl:1'):
    generate.read_prompts([], str(tmp_path / 'bad.jsonl'))


def test_calm_generate_prints_and_writes_jsonl(lm_with_vocab, repo_root, tmp_path):
  out = tmp_path / 'out.jsonl'
  env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.generate', f'--checkpoint={lm_with_vocab["lm"]}',
       '--prompt=the cat', '--prompt=a dog', '--max_decode_len=4', f'--output_file={out}'],
      capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['prompt'] for r in records] == ['the cat', 'a dog']
  for record in records:
    assert record['prompt'] + record['text'] in result.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'calm_jax.cli.generate', f'--checkpoint={tmp_path / "none"}',
       '--prompt=x'], capture_output=True, text=True, timeout=300, env=env, check=False)
  assert bad.returncode != 0 and 'calm-generate:' in bad.stderr
  assert 'does not exist' in bad.stderr


def test_text_lm_task_tokenizes_lines_with_the_checkpoint_vocabulary(lm_with_vocab):
  name = text_lm.register_text_lm('test_text_lm', file_pattern=lm_with_vocab['corpus'],
                                  vocabulary_path=lm_with_vocab['lm'])
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(name)
  examples = list(task.get_dataset({'targets': 16}, split='train', shuffle=False)
                  .take(3).as_numpy_iterator())
  processor = spm.SentencePieceProcessor(model_file=lm_with_vocab['sp'])
  for example, line in zip(examples, TEXT):
    assert list(example['targets']) == processor.encode(line) + [1]


def test_text_lm_errors_name_the_missing_pattern_and_vocabulary(lm_with_vocab, tmp_path):
  with pytest.raises(FileNotFoundError, match='matches no file'):
    text_lm.register_text_lm('bad', file_pattern=str(tmp_path / '*.none'),
                             vocabulary_path=lm_with_vocab['lm'])
  with pytest.raises(FileNotFoundError, match='SentencePiece model file'):
    text_lm.register_text_lm('bad', file_pattern=lm_with_vocab['corpus'],
                             vocabulary_path=str(tmp_path))
