"""Composing models with different tokenizers: spans, read keys, and the causal cross mask.

Two SentencePiece vocabularies trained here on stdlib docstrings: a character-level one (the
anchor reads one character per token) and a coarse unigram one (the augment's tokens span
several characters), both with byte fallback.
"""

import collections
import dataclasses
import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from calm_jax import alignment, decoding, masks
from calm_jax.calm import AugmentStream, Calm
from calm_jax.configs import BridgeConfig, CalmConfig, TransformerConfig

TEXTS = ['The quick brown fox jumps over the lazy dog.',
         'héllo ☃ wörld: 中文 and 𒀀 bytes',
         'def f(x):\n    return x + 12  # done',
         ' leading and  double  spaces ']


def _train(tmp_path, name, **kwargs):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'corpus.txt'
  if not corpus.exists():
    docs = [inspect.getdoc(m) or '' for m in (json, collections, inspect, np, pytest)]
    corpus.write_text('\n'.join(line for d in docs for line in d.splitlines() if line.strip()))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / name), byte_fallback=True, pad_id=0,
      eos_id=1, unk_id=2, bos_id=3, character_coverage=1.0, minloglevel=2, num_threads=1,
      hard_vocab_limit=False,
      **kwargs)
  return seqio.SentencePieceVocabulary(str(tmp_path / f'{name}.model'))


@pytest.fixture(scope='module')
def vocabularies(tmp_path_factory):
  root = tmp_path_factory.mktemp('spm')
  chars = _train(root, 'chars', model_type='char', vocab_size=400)
  words = _train(root, 'words', model_type='unigram', vocab_size=800)
  return chars, words


@pytest.mark.parametrize('text', TEXTS)
def test_every_token_ends_where_its_bytes_end(vocabularies, text):
  raw = text.encode('utf-8')
  for vocabulary in vocabularies:
    ids, ends = alignment.token_ends(vocabulary, text)
    assert list(ids) == list(vocabulary.encode(text))
    # The default normaliser drops the trailing space: no token covers it.
    assert np.all(np.diff(ends) >= 0) and ends[-1] == len(raw.rstrip(b' '))
    processor = vocabulary.tokenizer
    for i, token in enumerate(ids.tolist()):
      if processor.is_byte(token):  # A byte piece covers exactly its own byte.
        assert raw[ends[i] - 1] == int(processor.id_to_piece(token)[1:-1], 16)
        assert i == 0 or ends[i] == ends[i - 1] + 1 or not processor.is_byte(ids[i - 1])
      elif text in TEXTS[:2]:  # No whitespace the normaliser changes: decoding the tokens
        # so far gives the text up to the token's end.
        assert vocabulary.decode(ids[:i + 1].tolist()) == raw[:ends[i]].decode('utf-8')


def test_byte_level_bpe_ends_are_its_bytes(tmp_path):
  import gguf_fixtures as fx  # pylint: disable=g-import-not-at-top
  from calm_jax.convert import gguf_file  # pylint: disable=g-import-not-at-top
  from calm_jax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  path = fx.write_gguf(tmp_path / 'qwen.gguf', 'qwen2')
  gguf_file.convert_gguf_file(str(path), str(tmp_path / 'lm'), log=lambda *a: None)
  vocabulary = vocab_lib.load_vocabulary(tmp_path / 'lm')
  for text in TEXTS:
    ids, ends = alignment.token_ends(vocabulary, text)
    assert ends[-1] == len(text.encode('utf-8')) and np.all(np.diff(ends) > 0)
    assert vocabulary.decode(ids.tolist()) == text


def test_read_keys_order_what_was_read():
  # BOS (reads nothing), 'ab' (to byte 2), two byte pieces of one character (bytes 3, 4),
  # EOS (nothing new).
  keys = alignment.read_keys([0, 2, 3, 4, 4])
  s = alignment.KEY_SCALE
  assert keys.tolist() == [1, 2 * s, 3 * s, 4 * s, 4 * s + 1]
  assert alignment.decoder_read_keys(keys).tolist() == [0, 1, 2 * s, 3 * s, 4 * s]
  with pytest.raises(alignment.AlignmentError, match='read nothing'):
    alignment.read_keys([1] * (alignment.KEY_SCALE + 1))


# The composition: a character-level anchor and a coarse augment.

def _config(anchor_vocab, augment_vocab, own=True):
  anchor = TransformerConfig(vocab_size=anchor_vocab, embed_dim=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, head_dim=16, mlp_dim=64, dtype='float32')
  augment = TransformerConfig(vocab_size=augment_vocab, embed_dim=24, num_layers=2,
                              num_heads=2, num_kv_heads=2, head_dim=12, mlp_dim=48,
                              dtype='float32')
  return CalmConfig(anchor=anchor, augments={'aug': augment},
                    bridges={'aug': BridgeConfig(connections=((1, 1), (2, 2)),
                                                 zero_init_out=False)},
                    own_tokenizer=('aug',) if own else ())


def _params(config, seed=0):
  tokens = jnp.zeros((1, 4), jnp.int32)
  streams = {name: AugmentStream(tokens, jnp.zeros_like(tokens), jnp.zeros_like(tokens))
             for name in config.own_tokenizer}
  return Calm(config).init(jax.random.key(seed), tokens, streams=streams)['params']


def _example(vocabulary, text, bos):
  ids, ends = alignment.stream(vocabulary, [bos, text, vocabulary.eos_id])
  keys = alignment.decoder_read_keys(alignment.read_keys(ends))
  inputs = np.concatenate([[0], ids[:-1]]).astype(np.int32)
  return inputs, keys


def _pad(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def test_one_shared_tokenizer_is_todays_composition_bit_for_bit(vocabularies):
  _, words = vocabularies
  config = _config(words.vocab_size, words.vocab_size, own=True)
  shared = _config(words.vocab_size, words.vocab_size, own=False)
  params = _params(shared, seed=3)
  rows = [_example(words, text, 3) for text in TEXTS]
  length = max(len(r[0]) for r in rows) + 3  # Padding at every row's end.
  tokens = jnp.asarray(_pad([r[0] for r in rows], length))
  keys = jnp.asarray(_pad([r[1] for r in rows], length))
  segments = jnp.asarray(_pad([np.ones(len(r[0])) for r in rows], length))
  today = Calm(shared).apply({'params': params}, tokens, segment_ids=segments)
  stream = AugmentStream(tokens, keys, keys, segment_ids=segments)
  aligned = Calm(config).apply({'params': params}, tokens, segment_ids=segments,
                               streams={'aug': stream})
  np.testing.assert_array_equal(np.asarray(aligned.logits), np.asarray(today.logits))
  # The masks themselves: read keys give the index mask exactly.
  np.testing.assert_array_equal(
      masks.aligned_cross_mask(keys, keys, segments, segments), masks.cross_mask(segments))


def _stable_prefix(vocabulary, text, changed, cut):
  """Whether the tokens ending at or before byte `cut` are the same in both texts."""
  a_ids, a_ends = alignment.token_ends(vocabulary, text)
  b_ids, b_ends = alignment.token_ends(vocabulary, changed)
  a = [(i, e) for i, e in zip(a_ids.tolist(), a_ends.tolist()) if e <= cut]
  b = [(i, e) for i, e in zip(b_ids.tolist(), b_ends.tolist()) if e <= cut]
  return a == b


def _logits(config, params, chars, words, text, index_mask=False, length=96):
  """The anchor's logits over `text` (both streams padded to `length`: equal shapes, so
  equal inputs give bit-equal outputs), and its inputs' read keys."""
  a_tokens, a_keys = _example(chars, text, 3)
  m_tokens, m_keys = _example(words, text, 3)
  if index_mask:  # Negative control: pair tokens by index, as a shared tokenizer would.
    a_keys, m_keys = np.arange(len(a_tokens)), np.arange(len(m_tokens))
  pad = lambda row: jnp.asarray(_pad([row], length))
  stream = AugmentStream(pad(m_tokens), pad(m_keys), pad(a_keys),
                         segment_ids=pad(np.ones(len(m_tokens))))
  out = Calm(config).apply({'params': params}, pad(a_tokens),
                           segment_ids=pad(np.ones(len(a_tokens))), streams={'aug': stream})
  return np.asarray(out.logits[0, :len(a_tokens)]), a_keys


def test_changing_a_character_changes_no_anchor_logit_that_has_not_read_it(vocabularies):
  chars, words = vocabularies
  config = _config(chars.vocab_size, words.vocab_size)
  params = _params(config, seed=1)
  text = 'The composition reads what the anchor has read, and nothing after it.'
  checked = failed_by_index = 0
  for c in range(8, len(text) - 4, 3):
    changed = text[:c] + ('Z' if text[c] != 'Z' else 'Q') + text[c + 1:]
    cut = len(text[:c].encode('utf-8'))
    # The claim is about the text: it needs both tokenizations of the unchanged prefix to be
    # the ones of the changed text (a tokenizer may re-segment earlier text; not here).
    if not (_stable_prefix(chars, text, changed, cut) and
            _stable_prefix(words, text, changed, cut)):
      continue
    before, keys = _logits(config, params, chars, words, text)
    after, _ = _logits(config, params, chars, words, changed)
    unread = keys <= cut * alignment.KEY_SCALE  # Anchor inputs that have not read byte `cut`.
    assert unread.sum() > 3
    np.testing.assert_array_equal(after[unread], before[unread])
    assert np.abs(after[~unread] - before[~unread]).max() > 1e-4  # The change does arrive.
    checked += 1
    before_i, _ = _logits(config, params, chars, words, text, index_mask=True)
    after_i, _ = _logits(config, params, chars, words, changed, index_mask=True)
    failed_by_index += np.abs(after_i[unread] - before_i[unread]).max() > 1e-4
  assert checked >= 5, checked
  # A token-index mask lets the character anchor read coarse augment tokens past the change.
  assert failed_by_index == checked, (failed_by_index, checked)


def test_streams_must_match_the_config(vocabularies):
  chars, words = vocabularies
  config = _config(chars.vocab_size, words.vocab_size)
  params = _params(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match='own tokenizer'):
    Calm(config).apply({'params': params}, tokens)
  with pytest.raises(ValueError, match='own tokenizer'):
    Calm(config).apply({'params': params}, tokens, jnp.ones_like(tokens), cache_length=8,
                       method=Calm.prefill)


@functools.lru_cache(maxsize=None)
def _forward(config):
  return jax.jit(lambda p, *a: Calm(config).apply({'params': p}, a[0], segment_ids=a[1],
                                                  streams={'aug': AugmentStream(*a[2:])}))


def _full_forward_last(config, params, row, length=80):
  """The logits at the last input of a full forward pass over `row`'s text so far (padded to
  `length`: one compiled program)."""
  a_tokens, a_keys = row.anchor_inputs()
  m_tokens, m_keys = row.augment_inputs()
  pad = lambda x: jnp.asarray(_pad([x], length))
  out = _forward(config)(params, pad(a_tokens), pad(np.ones(len(a_tokens))), pad(m_tokens),
                         pad(m_keys), pad(a_keys), None, pad(np.ones(len(m_tokens))))
  return np.asarray(out.logits[0, len(a_tokens) - 1])


def _decoding_setup(vocabularies):
  """(config, params, make): `make()` gives fresh decoding rows of two prompts whose augment
  tokenization changes at the boundary as text is generated."""
  chars, words = vocabularies
  config = _config(chars.vocab_size, words.vocab_size)
  prompts = ['The composition of', 'héllo wörld, then']
  make = lambda: [alignment.DecodingRow(chars, words, p, anchor_bos=3, augment_bos=3)
                  for p in prompts]
  return config, _params(config, seed=2), make


def test_cached_decoding_equals_the_full_forward_at_every_step(vocabularies):
  config, params, make = _decoding_setup(vocabularies)
  rows = make()
  steps = 24
  tokens, logits = decoding.generate_aligned(Calm(config), params, rows, max_decode_len=steps,
                                             eos_id=-1, return_logits=True)
  # The augment's tokens of the growing text changed at the boundary (merges), so its caches
  # rolled back and re-ran their tail.
  assert sum(row.rollbacks for row in rows) >= 3, [row.rollbacks for row in rows]
  replay = make()
  for i in range(steps):
    for r, row in enumerate(replay):
      np.testing.assert_allclose(logits[r, i], _full_forward_last(config, params, row),
                                 rtol=0, atol=1e-5, err_msg=f'row {r}, step {i}')
      if i < steps - 1:  # The decoder feeds every token but the last.
        row.push(int(tokens[r, i]))
  assert [row.augment_ids for row in replay] == [row.augment_ids for row in rows]


def test_sampled_decoding_samples_the_full_forwards_logits(vocabularies):
  config, params, make = _decoding_setup(vocabularies)
  steps, rng = 16, jax.random.key(7)
  sampling = decoding.Sampling(temperature=1.5, top_k=40)
  tokens, logits = decoding.generate_aligned(Calm(config), params, make(), max_decode_len=steps,
                                             eos_id=-1, return_logits=True, sampling=sampling,
                                             rng=rng)
  greedy = decoding.generate_aligned(Calm(config), params, make(), max_decode_len=steps,
                                     eos_id=-1)
  assert (tokens != greedy).any()  # It samples.
  replay = make()
  for i in range(steps):
    # Step i's logits are a full forward pass over the text sampled so far, and its tokens
    # are the batch's sample of them under fold_in(rng, i).
    full = np.stack([_full_forward_last(config, params, row) for row in replay])
    np.testing.assert_allclose(logits[:, i], full, rtol=0, atol=1e-5, err_msg=f'step {i}')
    expected = decoding.sample_tokens(jax.random.fold_in(rng, i), jnp.asarray(logits[:, i]),
                                      sampling)
    np.testing.assert_array_equal(tokens[:, i], np.asarray(expected))
    for r, row in enumerate(replay):
      row.push(int(tokens[r, i]))


def _reference_beam_search(config, params, row, steps, width, eos_id, length_penalty):
  """Beam search by full forward passes over each beam's text (no caches): (tokens, score)."""
  log_softmax = lambda x: np.asarray(jax.nn.log_softmax(jnp.asarray(x)))
  beams = [(0.0, row.copy(), [], False)]
  for _ in range(steps):
    candidates = []
    for b, (score, beam_row, seq, done) in enumerate(beams):
      if done:
        candidates.append((score, b, 0))
        continue
      lp = log_softmax(_full_forward_last(config, params, beam_row))
      candidates.extend((score + float(lp[t]), b, t) for t in range(len(lp)))
    candidates.sort(key=lambda c: -c[0])
    new = []
    for score, b, t in candidates[:width]:
      _, beam_row, seq, done = beams[b]
      beam_row = beam_row.copy()
      if not done:
        beam_row.push(t)
      new.append((score, beam_row, seq + [t], done or t == eos_id))
    beams = new
    if all(done for *_, done in beams):
      break
  def normalised(beam):
    seq = beam[2]
    length = seq.index(eos_id) + 1 if eos_id in seq else steps
    return beam[0] / ((5.0 + length) / 6.0) ** length_penalty
  best = max(beams, key=normalised)
  return best[2] + [0] * (steps - len(best[2])), best[0]


def test_beam_search_with_an_own_tokenizer_equals_a_full_forward_beam_search(vocabularies):
  config, params, make = _decoding_setup(vocabularies)
  steps = 8
  greedy = decoding.generate_aligned(Calm(config), params, make(), max_decode_len=steps,
                                     eos_id=-1)
  one, _ = decoding.beam_search_aligned(Calm(config), params, make(), max_decode_len=steps,
                                        eos_id=-1, num_beams=1)
  np.testing.assert_array_equal(one, greedy)  # One beam is greedy decoding.
  # An EOS the beams emit early (greedy's third token of the first prompt) exercises finished
  # beams and the length penalty.
  for eos_id, alpha in ((-1, 0.0), (int(greedy[0, 2]), 0.6)):
    rows = make()
    tokens, scores = decoding.beam_search_aligned(Calm(config), params, rows,
                                                  max_decode_len=steps, eos_id=eos_id,
                                                  num_beams=3, length_penalty=alpha)
    assert [row.generated for row in rows] == [[], []]  # The prompts' rows are left alone.
    for r, row in enumerate(make()):
      expected, score = _reference_beam_search(config, params, row, steps, 3, eos_id, alpha)
      assert tokens[r].tolist() == expected, (eos_id, r)
      np.testing.assert_allclose(scores[r], score, rtol=1e-4, atol=1e-4)
    if eos_id == -1:
      assert (tokens != greedy).any()  # The beams found something greedy decoding did not.
    else:
      assert (tokens == eos_id).any()  # Some best beam finished.


def test_prefix_lm_features_follow_seqios_layout(vocabularies):
  chars, words = vocabularies
  f = alignment.prefix_lm_features(chars, words, 'Summary:', ' ok', length=16, anchor_bos=3)
  # Anchor: BOS + 8 characters of inputs, then ' ok' and EOS as targets (a char model adds
  # the dummy-prefix piece), shifted behind a 0 for the inputs.
  inputs = [3] + chars.encode('Summary:')
  targets = chars.encode(' ok') + [1]
  n = len(inputs) + len(targets)
  assert f['decoder_target_tokens'][:n].tolist() == inputs + targets
  assert f['decoder_input_tokens'][:n].tolist() == [0] + (inputs + targets)[:-1]
  assert f['decoder_loss_weights'].tolist() == [0] * len(inputs) + [1] * len(targets) + [0] * (
      16 - n)
  assert f['decoder_causal_attention'].tolist() == [1] * (len(inputs) + 1) + [0] * (
      15 - len(inputs))
  assert f['decoder_segment_ids'].tolist() == [1] * n + [0] * (16 - n)
  # The augment reads the same text in its own tokens; the last anchor input (EOS's) has
  # read everything, so it may read every real augment input.
  m = int(f['augment_segment_ids'].sum())
  assert m == len(words.encode('Summary:')) + len(words.encode(' ok')) + 1
  last = f['decoder_read_keys'][n - 1]
  assert (f['augment_read_keys'][:m] <= last).all()
  assert f['decoder_read_keys'][:n].tolist() == sorted(f['decoder_read_keys'][:n].tolist())


def test_a_composition_step_trains_the_bridges_over_an_own_tokenizer_augment(vocabularies):
  import optax  # pylint: disable=g-import-not-at-top
  from calm_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  chars, words = vocabularies
  config = dataclasses.replace(  # Zero-initialised W_o: the composition starts as the anchor.
      _config(chars.vocab_size, words.vocab_size),
      bridges={'aug': BridgeConfig(connections=((1, 1), (2, 2)))})
  params = _params(config, seed=4)
  pairs = [('Summary: the key', ' is 7'), ('Summary: héllo', ' wörld'),
           ('Summary: def f', ' returns x'), ('Summary: a b c', ' d e f')]
  rows = [alignment.prefix_lm_features(chars, words, a, b, length=32, anchor_bos=3,
                                       augment_bos=3) for a, b in pairs]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  batch['decoder_loss_weights'] = batch['decoder_loss_weights'].astype(jnp.float32)
  frozen = {'anchor': params['anchor'], 'augments': params['augments']}
  before = jax.tree.map(np.array, frozen)
  optimizer = optax.adam(3e-3)
  state = ts.init_train_state({'bridge': params['bridge']}, optimizer)
  step = ts.make_train_step(ts.apply_fn_for(Calm(config)), optimizer)
  losses = []
  for _ in range(15):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.1, losses  # The bridges learn through the aligned mask.
  assert set(state.params) == {'bridge'}  # Frozen means frozen: no state, no writes.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)


def test_a_seqio_task_yields_both_streams_through_the_prefix_lm_converter(vocabularies):
  from calm_jax import data  # pylint: disable=g-import-not-at-top
  from calm_tasks import memory_tasks  # pylint: disable=g-import-not-at-top
  chars, words = vocabularies
  pairs = [('Summary: the key', ' is 7'), ('Summary: héllo', ' wörld'),
           ('Summary: a very long prompt that the anchor cannot keep whole', ' cut')]
  rows = [{'inputs': a, 'targets': b} for a, b in pairs]
  memory_tasks.aligned_seq2seq_task('aligned_test', chars, words, lambda split: rows,
                                    splits=('validation',), keep_prompt_end=True)
  lengths = {'inputs': 24, 'targets': 16}
  assert data.task_feature_names('aligned_test') == ('inputs', 'targets')
  batch = next(data.as_numpy_batches(data.get_dataset(
      'aligned_test', lengths, 'validation', 3, shuffle=False, num_epochs=1)))
  for name in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_read_keys',
               'augment_input_tokens', 'augment_read_keys'):
    assert batch[name].shape == (3, 40), name
  for r, (a, b) in enumerate(pairs[:2]):  # Short enough: exactly the numpy features.
    # These vocabularies define BOS 3, which the task puts first in both streams.
    expected = alignment.prefix_lm_features(chars, words, a, b, length=40, anchor_bos=3,
                                            augment_bos=3)
    assert set(expected) - set(batch) == {'decoder_segment_ids'}  # seqio: packing only.
    for name in set(expected) & set(batch):
      np.testing.assert_array_equal(batch[name][r], expected[name], err_msg=f'{name}, row {r}')
  # The long prompt kept its end; its keys still say what each kept token has read.
  kept = batch['decoder_target_tokens'][2]
  assert chars.decode(kept[:24].tolist()).endswith('keep whole')
  keys = batch['decoder_read_keys'][2][batch['decoder_target_tokens'][2] != 0]
  assert np.all(np.diff(keys) > 0)


def test_packing_both_streams_equals_the_examples_run_alone(vocabularies):
  from calm_jax import data, train_step  # pylint: disable=g-import-not-at-top
  from calm_tasks import memory_tasks  # pylint: disable=g-import-not-at-top
  chars, words = vocabularies
  rows = [{'inputs': a, 'targets': b} for a, b in PAIRS]
  memory_tasks.aligned_seq2seq_task('aligned_pack', chars, words, lambda split: rows,
                                    splits=('validation',))
  # Unpacked, the anchor (characters) reads 28, 31, 30, 23, 33, 29 tokens of the six
  # examples and the augment (coarser pieces) 16, 21, 19, 15, 25, 19.
  for augment_length in (None, 36):
    lengths = {'inputs': 48, 'targets': 32}
    if augment_length:
      lengths['augment_input_tokens'] = augment_length
    get = lambda pack, batch: next(data.as_numpy_batches(data.get_dataset(
        'aligned_pack', lengths, 'validation', batch, shuffle=False, num_epochs=1, pack=pack)))
    single = get(False, len(PAIRS))
    packed = get(True, 3)
    per_row = packed['decoder_segment_ids'].max(1).tolist()
    # 80 anchor slots take two examples a row; 36 augment slots do not take the first two
    # (16 + 21), though the anchor could: an example joins a row only if both streams fit.
    assert per_row == ([2, 2, 2] if augment_length is None else [1, 1, 2]), per_row
    # Example k of a row is segment k of both streams, each exactly its unpacked features.
    seen = 0
    for r in range(3):
      for k in range(1, per_row[r] + 1):
        anchor = packed['decoder_segment_ids'][r] == k
        aug = packed['augment_segment_ids'][r] == k
        assert aug.any()
        np.testing.assert_array_equal(packed['decoder_positions'][r][anchor],
                                      np.arange(anchor.sum()))
        np.testing.assert_array_equal(packed['augment_positions'][r][aug], np.arange(aug.sum()))
        for name, where in (('decoder_target_tokens', anchor), ('decoder_input_tokens', anchor),
                            ('decoder_loss_weights', anchor),
                            ('decoder_causal_attention', anchor), ('decoder_read_keys', anchor),
                            ('augment_input_tokens', aug), ('augment_read_keys', aug),
                            ('augment_causal_attention', aug)):
          alone = single[name][seen][:where.sum()]
          np.testing.assert_array_equal(packed[name][r][where], alone, err_msg=name)
        seen += 1
    # The composition on the packed rows gives each example the logits it has alone.
    config = _config(chars.vocab_size, words.vocab_size)
    params = _params(config, seed=3)
    apply = train_step.apply_fn_for(Calm(config))
    packed_logits = np.asarray(apply(params, {k: jnp.asarray(v) for k, v in packed.items()}))
    single_logits = np.asarray(apply(params, {k: jnp.asarray(v) for k, v in single.items()}))
    seen = 0
    for r in range(3):
      for k in range(1, per_row[r] + 1):
        anchor = packed['decoder_segment_ids'][r] == k
        np.testing.assert_allclose(packed_logits[r][anchor],
                                   single_logits[seen][:anchor.sum()], atol=1e-5, rtol=1e-5)
        seen += 1
    # Negative control: the augment's segments ignored (one segment per row), a packed
    # example's anchor reads the earlier examples' augment tokens and its logits change.
    merged = dict(packed, augment_segment_ids=np.where(packed['augment_segment_ids'] > 0, 1, 0))
    wrong = np.asarray(apply(params, {k: jnp.asarray(v) for k, v in merged.items()}))
    later = packed['decoder_segment_ids'] >= 2
    assert np.abs(wrong[later] - packed_logits[later]).max() > 1e-3


def test_a_composition_run_records_which_augments_read_their_own_tokens(tmp_path, vocabularies):
  from calm_jax import random_init, runs  # pylint: disable=g-import-not-at-top
  config = _config(400, 900)
  anchor = random_init.random_lm_checkpoint(config.anchor, tmp_path / 'anchor', 0)
  augment = random_init.random_lm_checkpoint(dict(config.augments)['aug'], tmp_path / 'aug', 1)
  (tmp_path / 'run').mkdir()
  with pytest.raises(ValueError, match='need their vocabularies'):
    runs.write_calm_run(tmp_path / 'run', config, anchor, {'aug': augment})
  chars = vocabularies[0]  # Any SentencePiece model: the file is copied into the run.
  runs.write_calm_run(tmp_path / 'run', config, anchor, {'aug': augment},
                      augment_vocabularies={'aug': chars})
  copied = runs.read_augment_vocabularies(tmp_path / 'run', {'aug': 'vocabularies/aug.model'})
  assert list(copied) == ['aug'] and copied['aug'].sp_model == chars.sp_model
  loaded, frozen = runs.read_calm_run(tmp_path / 'run')
  assert loaded == config and loaded.own_tokenizer == ('aug',)
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(frozen['augments']['aug']['embedder'])}
  assert sizes == {900}  # The augment's own vocabulary.


PAIRS = [('Summary: the key', ' is seven'), ('Summary: the lazy dog', ' sleeps'),
         ('Summary: def f(x)', ' returns x'), ('Summary: a b c', ' d e f'),
         ('Summary: quick brown', ' fox jumps'), ('Summary: over the', ' lazy dog')]


def _register_aligned(name, chars, words, metric_fns=()):
  from calm_tasks import memory_tasks  # pylint: disable=g-import-not-at-top
  rows = [{'inputs': a, 'targets': b} for a, b in PAIRS]
  memory_tasks.aligned_seq2seq_task(name, chars, words, lambda split: rows,
                                    metric_fns=metric_fns)


def test_calm_train_and_calm_infer_compose_an_augment_with_its_own_vocabulary(
    vocabularies, tmp_path):
  import functools as ft  # pylint: disable=g-import-not-at-top
  import calm_jax  # pylint: disable=g-import-not-at-top
  from calm_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from calm_jax import export as export_lib  # pylint: disable=g-import-not-at-top
  from calm_jax import infer as infer_lib  # pylint: disable=g-import-not-at-top
  from calm_jax import optim, random_init, runs, validation  # pylint: disable=g-import-not-at-top
  from calm_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  chars, words = vocabularies
  _register_aligned('aligned_run', chars, words)
  config = _config(chars.vocab_size, words.vocab_size)
  anchor = random_init.random_lm_checkpoint(config.anchor, tmp_path / 'anchor', 0)
  augment = random_init.random_lm_checkpoint(dict(config.augments)['aug'], tmp_path / 'aug', 1)
  run = functools.partial(
      train_lib.train, mixture_or_task_name='aligned_run',
      task_feature_lengths={'inputs': 24, 'targets': 16}, train_steps=6, batch_size=2,
      mode='compose', anchor_checkpoint=anchor, augment_checkpoints={'aug': augment},
      bridges={'aug': BridgeConfig(connections=((1, 1), (2, 2)))},
      optimizer_fn=ft.partial(optim.make_optimizer, learning_rate=3e-2), log_every=3,
      log=lambda _: None, warn=lambda _: None)
  # The task's augment stream is in `words`: naming no vocabulary, or another, is an error.
  with pytest.raises(validation.ConfigError, match='own vocabulary'):
    run(model_dir=str(tmp_path / 'none'))
  with pytest.raises(validation.ConfigError, match='not the one'):
    run(model_dir=str(tmp_path / 'other'), augment_vocabularies={'aug': chars})
  model_dir = tmp_path / 'run'
  run(model_dir=str(model_dir), augment_vocabularies={'aug': words.sentencepiece_model_file})
  assert json.loads((model_dir / 'run_definition.json').read_text())[
      'definition']['own_tokenizer'] == ['aug']
  loaded = runs.load_checkpoint(model_dir)
  assert loaded.model.config.own_tokenizer == ('aug',) and loaded.step == 6
  # The run carries its own copy.
  assert {k: v.sp_model for k, v in loaded.augment_vocabularies.items()} == {'aug': words.sp_model}
  bridge = loaded.params['bridge']
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(bridge))
  written = infer_lib.infer(
      checkpoint=str(model_dir), mixture_or_task_name='aligned_run',
      task_feature_lengths={'inputs': 24, 'targets': 10}, output_dir=str(tmp_path / 'infer'),
      batch_size=4, log=lambda _: None)
  records = [json.loads(line) for line in open(written['aligned_run'])]
  assert len(records) == len(PAIRS)
  # Independent of the caches: greedy decoding by a full forward pass over the text so far.
  for (prompt, _), record in zip(PAIRS, records):
    row = alignment.DecodingRow(chars, words, prompt, anchor_bos=3, augment_bos=3)
    expected = []
    for _ in range(10):
      token = int(np.argmax(_full_forward_last(loaded.model.config, loaded.params, row)))
      expected.append(token)
      if token == chars.eos_id:
        break
      row.push(token)
    got = record['prediction_tokens']
    assert got[:len(expected)] == expected, prompt
    assert record['inputs'] == prompt
  predictions = [r['prediction'] for r in records]
  # calm-eval decodes the same way through seqio's evaluator (the metric sees the texts).
  seen = []
  _register_aligned('aligned_run_eval', chars, words,
                    metric_fns=[lambda targets, predictions: seen.extend(predictions) or {
                        'n': float(len(predictions))}])
  scores = eval_lib.evaluate(checkpoint=str(model_dir), mixture_or_task_name='aligned_run_eval',
                             task_feature_lengths={'inputs': 24, 'targets': 10}, batch_size=4,
                             eval_dir=str(tmp_path / 'eval'))
  assert scores == {'aligned_run_eval': {'n': float(len(PAIRS))}} and seen == predictions
  # calm-export: the composed checkpoint carries both vocabularies and decodes alike.
  composed = export_lib.export(checkpoint=str(model_dir), output_dir=str(tmp_path / 'export'),
                               mixture_or_task_name='aligned_run', log=lambda _: None)
  again = calm_jax.load_composed(tmp_path / 'export')
  assert {k: v.sp_model for k, v in again.augment_vocabularies.items()} == {'aug': words.sp_model}
  assert again.vocabulary.sp_model == chars.sp_model
  assert composed.generate_text([p for p, _ in PAIRS], max_decode_len=10) == predictions
  with pytest.raises(ValueError, match='no serving artifact'):
    export_lib.export(checkpoint=str(tmp_path / 'export'), output_dir=str(tmp_path / 'export'),
                      serving_prompt_length=16, log=lambda _: None)
  # Beam search and sampling reach the own-tokenizer decoders from calm-infer and the export.
  make_rows = lambda: [alignment.DecodingRow(chars, words, p, anchor_bos=3, augment_bos=3)
                       for p, _ in PAIRS[:4]]
  beams = decoding.beam_search_aligned(loaded.model, loaded.params, make_rows(),
                                       max_decode_len=10, eos_id=chars.eos_id, num_beams=2)[0]
  sampled = decoding.generate_aligned(loaded.model, loaded.params, make_rows(),
                                      max_decode_len=10, eos_id=chars.eos_id,
                                      sampling=decoding.Sampling(temperature=0.7),
                                      rng=jax.random.fold_in(jax.random.key(5), 0))
  for kwargs, expected in ((dict(num_beams=2), beams), (dict(temperature=0.7, seed=5), sampled)):
    out = infer_lib.infer(checkpoint=str(model_dir), mixture_or_task_name='aligned_run',
                          task_feature_lengths={'inputs': 24, 'targets': 10},
                          output_dir=str(tmp_path / 'x'), batch_size=4, log=lambda _: None,
                          **kwargs)
    got = [json.loads(line)['prediction_tokens'] for line in open(out['aligned_run'])][:4]
    assert got == expected.tolist(), kwargs
  until_eos = lambda row: [t for t in (row.tolist() + [chars.eos_id])[
      :(row.tolist() + [chars.eos_id]).index(chars.eos_id)] if t]
  assert composed.generate_text([p for p, _ in PAIRS[:4]], max_decode_len=10, num_beams=2) == [
      chars.decode(until_eos(row)) for row in beams]
