"""Decoding: cached generation (greedy, sampling, beam search) of an LM or a composition.

`generate` and `beam_search` run one prefill over the prompts, then one compiled loop
(`lax.while_loop`) that feeds each new token to the model and advances its cache by one position
per row: for a composition, the anchor's KV cache, every augment's KV cache and every bridge's
cache of projected keys/values (calm.py). The same code decodes a single LM (`Transformer`).

Layout (T5X decoder-only, prefix LM): the model reads `decoder_input_tokens` = the sequence
shifted right by one with 0 first; `decoder_causal_attention` (the prompt mask) is 1 on the
prompt region of that input (the 0 and the n prompt tokens), so the logits at input index n
predict the first target. Prompts may have different lengths in one batch (left-aligned, any
padding after them). Token i of the continuation is fed at sequence index n + 1 + i, which is
also its RoPE position and cache slot, exactly as in a full forward pass over the sequence.

`greedy_decode` is the uncached reference: one full forward pass per generated token (O(T^2)
per sequence); the cached decoder must reproduce it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import calm as calm_lib
from calm_jax import partitioning, transformer
from calm_jax.transformer import last_prompt_index

Array = jax.Array
_NEG_INF = -np.inf
# logits_fn(tokens [B, L]) -> logits [B, L, V] (prompt masks etc. bound by the caller).
LogitsFn = Callable[[Array], Array]


def greedy_decode(logits_fn: LogitsFn, input_tokens: Array, prompt_mask: Array,
                  max_decode_len: int, eos_id: int) -> Array:
  """Greedy continuation of each row's prompt.

  Args:
    logits_fn: maps input tokens [B, L] to logits [B, L, V]; L >= prompt + max_decode_len.
    input_tokens: [B, L] decoder input tokens; only the prompt region is read.
    prompt_mask: [B, L] `decoder_causal_attention` (1 on the prompt region, a prefix).
    max_decode_len: number of tokens to generate.
    eos_id: rows stop at EOS; later positions are filled with 0 (padding).

  Returns:
    [B, max_decode_len] generated token ids.
  """
  batch, length = input_tokens.shape
  last = jnp.sum(prompt_mask, axis=1).astype(jnp.int32) - 1  # [B] index of last prompt token.
  positions = jnp.arange(length)[None, :]
  tokens = jnp.where(positions <= last[:, None], input_tokens, 0)
  rows = jnp.arange(batch)

  def body(i, carry):
    tokens, out, done = carry
    cursor = last + i  # [B] input index whose logits predict the i-th new token.
    logits = logits_fn(tokens)
    next_token = jnp.argmax(logits[rows, jnp.minimum(cursor, length - 1)], axis=-1)
    next_token = jnp.where(done, 0, next_token).astype(tokens.dtype)
    out = out.at[:, i].set(next_token)
    write = jnp.minimum(cursor + 1, length - 1)
    tokens = tokens.at[rows, write].set(jnp.where(cursor + 1 < length, next_token,
                                                  tokens[rows, write]))
    return tokens, out, done | (next_token == eos_id)

  out = jnp.zeros((batch, max_decode_len), input_tokens.dtype)
  done = jnp.zeros((batch,), bool)
  _, out, _ = jax.lax.fori_loop(0, max_decode_len, body, (tokens, out, done))
  return out


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `generate` picks each token.

  Attributes:
    temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / t).
    top_k: if > 0, sample among the k most likely tokens only.
    top_p: if < 1, sample among the smallest set of most likely tokens whose probability
      reaches p (nucleus sampling; tokens tied with the last one kept are kept too).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}.')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}.')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}.')


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits [..., V] outside the top-k / top-p set to -inf (see `Sampling`)."""
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass of the tokens ranked above it is still below p.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG_INF, logits)
  return logits


def sample_tokens(rng: Array, logits: Array, sampling: Sampling) -> Array:
  """One token per row of logits [B, V] (float32), following `sampling`; returns [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill(model: nn.Module, params: Any, input_tokens: Array, prompt_mask: Array,
            max_decode_len: int) -> tuple[Array, Array, Any]:
  """Runs the prompts through `model.prefill` with a cache of prompt + `max_decode_len` slots.

  Args:
    model: a `Transformer` or a `Calm` (anything with `prefill` / `extend` of their signature).
    params: its parameters.
    input_tokens: [B, P] decoder input tokens; only each row's prompt region is read.
    prompt_mask: [B, P] `decoder_causal_attention`; a row without prompt decodes from its
      first token (the 0 that starts T5X's inputs).
    max_decode_len: tokens the cache must still hold.

  Returns:
    (index of each row's last prompt token [B], its logits [B, V], the cache).
  """
  length = input_tokens.shape[1]
  last = last_prompt_index(prompt_mask)
  prompt_mask = (jnp.arange(length)[None, :] <= last[:, None]).astype(jnp.int32)
  tokens = jnp.where(prompt_mask == 1, input_tokens, 0)
  # Logits at each row's last prompt token only: [B, V], not [B, P, V].
  out = model.apply({'params': params}, tokens, prompt_mask,
                    cache_length=length + max_decode_len, method=type(model).prefill)
  return last, out.logits[:, 0], out.cache


def extend(model: nn.Module, params: Any, tokens: Array, positions: Array, cache: Any):
  """One cached step (`model.extend`): tokens [B, 1] at `positions` [B, 1]; (logits, cache)."""
  out = model.apply({'params': params}, tokens, positions, cache, method=type(model).extend)
  return out.logits[:, 0], out.cache


def generate(model: nn.Module, params: Any, input_tokens: Array, prompt_mask: Array, *,
             max_decode_len: int, eos_id: int, sampling: Sampling = Sampling(),
             rng: Array | None = None,
             constrain_cache: Callable[[Any], Any] | None = None) -> Array:
  """Continues each row's prompt with the KV-cached model.

  Args:
    model: a `Transformer` or a `Calm`.
    params: its parameters (unboxed).
    input_tokens: [B, P] decoder input tokens; only the prompt region is read.
    prompt_mask: [B, P] `decoder_causal_attention`, 1 on each row's prompt region (a prefix).
    max_decode_len: number of tokens to generate.
    eos_id: a row stops after emitting EOS; its later tokens are 0 (padding). The loop ends
      when every row has stopped.
    sampling: greedy (default) or sampling with temperature / top-k / top-p.
    rng: PRNG key for sampling; token i uses `fold_in(rng, i)`.
    constrain_cache: applied to the cache after the prefill and after every step (on a mesh:
      its layout, `cache_shardings`); None: XLA chooses.

  Returns:
    [B, max_decode_len] int32 generated tokens.
  """
  if sampling.temperature > 0 and rng is None:
    raise ValueError('sampling with temperature > 0 needs an rng.')
  rng = jax.random.key(0) if rng is None else rng
  constrain_cache = constrain_cache or (lambda cache: cache)
  batch = input_tokens.shape[0]
  last, logits, cache = prefill(model, params, input_tokens, prompt_mask, max_decode_len)
  cache = constrain_cache(cache)
  token = sample_tokens(jax.random.fold_in(rng, 0), logits, sampling)
  out = jnp.zeros((batch, max_decode_len), jnp.int32).at[:, 0].set(token)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_decode_len) & ~jnp.all(done)

  def body(carry):
    i, out, cache, token, done = carry
    logits, cache = extend(model, params, token[:, None], (last + i)[:, None], cache)
    cache = constrain_cache(cache)
    token = sample_tokens(jax.random.fold_in(rng, i), logits, sampling)
    token = jnp.where(done, 0, token)
    out = out.at[:, i].set(token)
    return i + 1, out, cache, token, done | (token == eos_id)

  carry = (jnp.asarray(1), out, cache, token, token == eos_id)
  return jax.lax.while_loop(cond, body, carry)[1]


def beam_search(model: nn.Module, params: Any, input_tokens: Array, prompt_mask: Array, *,
                max_decode_len: int, eos_id: int, num_beams: int,
                length_penalty: float = 0.0,
                constrain_cache: Callable[[Any], Any] | None = None) -> tuple[Array, Array]:
  """Beam search with the KV-cached model.

  Beams are ranked by the sum of their tokens' log-probabilities; a beam that emitted EOS keeps
  its score and continues with padding (0) only. The returned beam maximises
  score / ((5 + length) / 6) ** length_penalty (length counts up to and including EOS).
  With `num_beams = 1` this is greedy decoding.

  Args:
    model, params, input_tokens, prompt_mask, max_decode_len, eos_id, constrain_cache: as in
      `generate`.
    num_beams: W beams per row (W <= vocabulary size).
    length_penalty: alpha of the length normalisation of the final choice (0: none).

  Returns:
    ([B, max_decode_len] int32 tokens of the best beam, [B] its log-probability).
  """
  batch = input_tokens.shape[0]
  width = num_beams
  last, logits, cache = prefill(model, params, input_tokens, prompt_mask, max_decode_len)
  vocab = logits.shape[-1]
  if width > vocab:
    raise ValueError(f'num_beams {width} exceeds the vocabulary size {vocab}.')
  # Every beam of a row starts from the row's prompt cache.
  constrain_cache = constrain_cache or (lambda cache: cache)
  cache = constrain_cache(jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), cache))
  rows = jnp.arange(batch)[:, None]
  pad_only = jnp.full((vocab,), _NEG_INF, jnp.float32).at[0].set(0.0)

  def select(i, log_probs, scores, done, seqs, cache):
    # log_probs [B, W, V]; finished beams may only add padding at no cost.
    log_probs = jnp.where(done[:, :, None], pad_only, log_probs)
    candidates = (scores[:, :, None] + log_probs).reshape(batch, width * vocab)
    scores, flat = jax.lax.top_k(candidates, width)
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    done = done[rows, beam] | (token == eos_id)
    seqs = seqs[rows, beam].at[:, :, i].set(token)
    cache = constrain_cache(jax.tree.map(
        lambda x: x.reshape(batch, width, *x.shape[1:])[rows, beam].reshape(x.shape), cache))
    return scores, done, seqs, cache

  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_probs = jnp.broadcast_to(log_probs[:, None, :], (batch, width, vocab))
  scores = jnp.full((batch, width), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
  done = jnp.zeros((batch, width), bool)
  seqs = jnp.zeros((batch, width, max_decode_len), jnp.int32)
  scores, done, seqs, cache = select(0, log_probs, scores, done, seqs, cache)
  positions = jnp.repeat(last, width)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < max_decode_len) & ~jnp.all(done)

  def body(carry):
    i, scores, done, seqs, cache = carry
    tokens = seqs[:, :, i - 1].reshape(batch * width, 1)
    logits, cache = extend(model, params, tokens, (positions + i)[:, None], cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return (i + 1, *select(i, log_probs.reshape(batch, width, vocab), scores, done, seqs,
                           cache))

  _, scores, done, seqs, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1), scores, done, seqs, cache))
  is_eos = seqs == eos_id
  length = jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1) + 1, max_decode_len)
  normalised = scores / ((5.0 + length) / 6.0) ** length_penalty
  best = jnp.argmax(normalised, axis=-1)
  return seqs[jnp.arange(batch), best], scores[jnp.arange(batch), best]


def abstract_params_of(model: nn.Module) -> Any:
  """The boxed abstract parameter tree (logical axis names) of a `Calm` or a `Transformer`."""
  if isinstance(model, calm_lib.Calm):
    return calm_lib.abstract_params(model.config)
  return transformer.abstract_params(model.config, getattr(model, 'lora', None))


def decoding_mesh(mesh_config: Any, batch_size: int) -> tuple[jax.sharding.Mesh, Any]:
  """(mesh over every device, rules) of a `partitioning.MeshConfig` for decoding batches of
  `batch_size` rows (calm-eval, calm-infer; `mesh_placement` refuses the models it cannot
  decode).

  Raises:
    ValueError: a batch the mesh's replica x data axes do not divide.
  """
  mesh = partitioning.make_mesh(mesh_config)
  rows = mesh.shape['replica'] * mesh.shape['data']
  if batch_size % rows:
    raise ValueError(f'BATCH_SIZE {batch_size} does not divide over the mesh\'s replica x '
                     f'data = {rows} devices.')
  return mesh, mesh_config.rules()


def mesh_placement(mesh: jax.sharding.Mesh, rules: Any) -> Callable[[nn.Module], Any]:
  """The shardings `mesh` and `rules` give a model's parameters, as a function of the model:
  what `runs.load_checkpoint(shardings=...)` takes to restore a checkpoint straight into the
  layout `make_generate_fn(mesh=mesh, rules=rules)` decodes with.

  The function raises ValueError for a composition whose augment reads its own tokenization
  (its decoding tokenizes on the host, row by row), before anything is read.
  """
  def placement(model: nn.Module) -> Any:
    own = tuple(getattr(getattr(model, 'config', None), 'own_tokenizer', ()))
    if own:
      raise ValueError(f'decoding on a mesh is not available for augments with their own '
                       f'tokenizer ({list(own)}): their decoding runs on the host.')
    return partitioning.param_shardings(abstract_params_of(model), mesh, rules)
  return placement


def shard_params(model: nn.Module, params: Any, mesh: jax.sharding.Mesh, rules: Any) -> Any:
  """`params` placed in the shardings `mesh` and `rules` give `model`'s parameters (entries
  the model never reads are dropped)."""
  shardings = partitioning.param_shardings(abstract_params_of(model), mesh, rules)
  return jax.tree.map(_place, _prune(params, shardings), shardings)


def _place(x: Any, sharding: jax.sharding.Sharding) -> Array:
  """A global array of host (or single-device) value `x`, the same on every process: each
  process writes only the shards of its own devices (multi-host safe)."""
  if isinstance(x, jax.Array) and x.is_fully_addressable and len(x.devices()) > 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _prune(params: Any, like: Any) -> Any:
  """`params` with only the entries of the tree `like` (a frozen augment's checkpoint carries
  a head and layers above its deepest connection that the composition never runs)."""
  if isinstance(like, Mapping):
    missing = set(like) - set(params)
    if missing:
      raise ValueError(f'parameters lack {sorted(missing)}')
    return {k: _prune(params[k], v) for k, v in like.items()}
  return params


def cache_shardings(cache: Any, mesh: jax.sharding.Mesh, rules: Any) -> Any:
  """Shardings of a decoding cache (arrays or shapes): [B, L, K, H] keys and values as
  ('batch', 'length', 'kv_heads', 'kv'), per-row vectors ([B] prompt lengths, [B, L] read
  keys) over the batch.

  Where the key/value heads do not divide over the axes `kv_heads` maps to (Gemma-2-9B's 8
  heads on a model axis of 16), the head dimension `kv` is split over them instead: a step
  then sums partial attention scores across those devices (a [B, heads, slots] all-reduce
  per layer, `partitioning.constrain_query_to_cache`) rather than each device holding every
  head's whole cache.
  """
  def sharding(x):
    if len(x.shape) == 4:
      return jax.sharding.NamedSharding(mesh, partitioning.cache_spec(x.shape, rules, mesh))
    names = ('batch',) + ('length',) * (len(x.shape) - 1)
    return jax.sharding.NamedSharding(
        mesh, partitioning.logical_to_spec(names, rules, mesh, x.shape))
  return jax.tree.map(sharding, cache)


def _cache_constraint(mesh: jax.sharding.Mesh, rules: Any) -> Callable[[Any], Any]:
  """Constrains a decoding cache to `cache_shardings` inside a jitted program."""
  return lambda cache: jax.lax.with_sharding_constraint(
      cache, cache_shardings(cache, mesh, rules))


def lower_decode_step(model: nn.Module, mesh: jax.sharding.Mesh, rules: Any, batch: int,
                      cache_length: int, prompt_length: int = 1) -> Any:
  """Lowers one decoding step (`extend`: a token per row, the cache donated) of `model` on
  `mesh` from shapes alone, parameters and cache in their shardings (`shard_params`,
  `cache_shardings`): what `launch/aot_compile.py --program=decode` compiles for a TPU."""
  abstract = abstract_params_of(model)
  params = partitioning.with_shardings(nn.unbox(abstract),
                                      partitioning.param_shardings(abstract, mesh, rules))
  prompts = jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32)
  cache = jax.eval_shape(lambda p, t: model.apply(
      {'params': p}, t, jnp.ones(t.shape, jnp.int32), cache_length=cache_length,
      method=type(model).prefill).cache, params, prompts)
  shardings = cache_shardings(cache, mesh, rules)
  cache = partitioning.with_shardings(cache, shardings)
  column = jax.ShapeDtypeStruct((batch, 1), jnp.int32,
                                sharding=partitioning.batch_sharding(mesh, rules))

  def step(params, tokens, positions, cache):
    with partitioning.activation_context(mesh, rules):
      return extend(model, params, tokens, positions, cache)

  vocab = (model.config.anchor if isinstance(model, calm_lib.Calm) else model.config).vocab_size
  logits = jax.sharding.NamedSharding(
      mesh, partitioning.logical_to_spec(('batch', 'vocab'), rules, mesh, (batch, vocab)))
  return jax.jit(step, donate_argnums=(3,), out_shardings=(logits, shardings)).lower(
      params, column, column, cache)


def make_generate_fn(model: nn.Module, *, max_decode_len: int, eos_id: int,
                     sampling: Sampling = Sampling(), num_beams: int = 1,
                     length_penalty: float = 0.0, mesh: jax.sharding.Mesh | None = None,
                     rules: Any = None) -> Callable[[Any, Array, Array, Array], Array]:
  """A jitted `fn(params, input_tokens, prompt_mask, rng) -> [B, max_decode_len]` tokens.

  `num_beams > 1` selects beam search (then `sampling` must be greedy); otherwise `generate`.
  The function compiles once per input shape.

  With `mesh` and `rules` (`partitioning.MeshConfig`), the prefill and the decoding loop run
  on the mesh: parameters in their shardings (`shard_params`), the batch over the batch rule's
  axes (B must divide by their size), heads, MLP and vocabulary over `model`, the cache in
  `cache_shardings`, the model's activation constraints in force; the tokens come back
  batch-sharded.
  """
  if num_beams < 1:
    raise ValueError(f'num_beams must be >= 1, got {num_beams}.')
  if num_beams > 1 and sampling.temperature > 0:
    raise ValueError('beam search does not sample: set temperature 0 or num_beams 1.')

  constrain = None if mesh is None else _cache_constraint(mesh, rules)

  def fn(params, input_tokens, prompt_mask, rng):
    if num_beams > 1:
      return beam_search(model, params, input_tokens, prompt_mask,
                         max_decode_len=max_decode_len, eos_id=eos_id, num_beams=num_beams,
                         length_penalty=length_penalty, constrain_cache=constrain)[0]
    return generate(model, params, input_tokens, prompt_mask, max_decode_len=max_decode_len,
                    eos_id=eos_id, sampling=sampling, rng=rng, constrain_cache=constrain)

  if mesh is None:
    return jax.jit(fn)
  params_sharding = partitioning.param_shardings(abstract_params_of(model), mesh, rules)
  batch = partitioning.batch_sharding(mesh, rules)

  def sharded(params, input_tokens, prompt_mask, rng):
    with partitioning.activation_context(mesh, rules):
      return fn(params, input_tokens, prompt_mask, rng)

  return jax.jit(sharded, in_shardings=(params_sharding, batch, batch,
                                        partitioning.replicated(mesh)), out_shardings=batch)


def decode_batches(generate_fn: Callable[[Any, Array, Array, Array], Array], params: Any,
                   batches: Iterable[Mapping[str, np.ndarray]], batch_size: int, seed: int = 0,
                   mesh: jax.sharding.Mesh | None = None, rules: Any = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (number of real rows, [n, max_decode_len] tokens) per batch of model features.

  Batches are padded to `batch_size` rows so that every call has one shape (one compilation).
  Features without `decoder_causal_attention` (LM tasks) decode from the first token alone.

  Args:
    generate_fn: `make_generate_fn`'s function.
    params: the model's parameters.
    batches: host batches of model features (`decoder_input_tokens`, ...), at most
      `batch_size` rows each.
    batch_size: the rows of every call.
    seed: batch i samples with `fold_in(key(seed), i)`.
    mesh, rules: those of a `generate_fn` made for a mesh: every process reads the same
      batches and feeds the rows of its own devices; every process gets all the tokens back.
  """
  for i, features in enumerate(batches):
    tokens = features['decoder_input_tokens']
    n = len(tokens)
    pad = batch_size - n
    prompt = features.get('decoder_causal_attention')
    if prompt is None:
      prompt = np.zeros_like(tokens)
      prompt[:, 0] = 1
    tokens = np.pad(tokens, ((0, pad), (0, 0)))
    prompt = np.pad(prompt, ((0, pad), (0, 0)), constant_values=0)
    prompt[n:, 0] = 1  # Padding rows: a one-token prompt, ignored.
    tokens, prompt = tokens.astype(np.int32), prompt.astype(np.int32)
    if mesh is None:
      tokens, prompt = jnp.asarray(tokens), jnp.asarray(prompt)
    else:
      sharding = partitioning.batch_sharding(mesh, rules)
      tokens, prompt = (_place(x, sharding) for x in (tokens, prompt))
    out = generate_fn(params, tokens, prompt, jax.random.fold_in(jax.random.key(seed), i))
    if not out.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      out = multihost_utils.process_allgather(out, tiled=True)
    yield n, np.asarray(out)[:n]


def _pad_rows(rows: list[np.ndarray], length: int, value: int = 0) -> np.ndarray:
  out = np.full((len(rows), length), value, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _bucket(n: int) -> int:
  """The next power of two >= n: a changed tail of n tokens compiles once per bucket."""
  return 1 << max(0, int(n - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _aligned_fns(model: nn.Module, name: str, cache_length: int, augment_slots: int):
  """generate_aligned's compiled calls, kept so that later batches reuse them."""
  cls = type(model)
  prefill = jax.jit(lambda p, t, m, s: model.apply(
      {'params': p}, t, m, cache_length=cache_length, streams={name: s},
      augment_cache_length=augment_slots, method=cls.prefill))
  extend_augment = jax.jit(lambda p, *a: model.apply({'params': p}, name, *a,
                                                     method=cls.extend_augment))
  extend = jax.jit(lambda p, t, pos, c, k, i: model.apply(
      {'params': p}, t, pos, c, read_keys=k, logits_index=i, method=cls.extend))
  return prefill, extend_augment, extend


@functools.lru_cache(maxsize=16)
def _sample_fn(sampling: Sampling):
  """`sample_tokens` under `sampling`, compiled once per setting."""
  return jax.jit(lambda rng, logits: sample_tokens(rng, logits.astype(jnp.float32), sampling))


class _AlignedDecoder:
  """The cached state of decoding rows of `alignment.DecodingRow` (`generate_aligned`,
  `beam_search_aligned`): the composition's caches, each row's anchor position, and the
  compiled calls. `start` prefills the prompts, `step` feeds one anchor token per row,
  `reorder` gathers rows (beams)."""

  def __init__(self, model: nn.Module, params: Any, rows: list[Any], *, max_decode_len: int,
               augment_cache_length: int | None):
    from calm_jax.calm import AugmentStream  # pylint: disable=g-import-not-at-top
    own = model.config.own_tokenizer
    if len(own) != 1:
      raise ValueError(f'generate_aligned decodes a composition with one own-tokenizer '
                       f'augment, got {list(own)}.')
    self.params, self.rows = params, list(rows)
    anchor = [row.anchor_inputs() for row in rows]
    augment = [row.augment_inputs() for row in rows]
    # Prompt lengths in powers of two: batches of other prompts reuse the compiled prefill.
    length = _bucket(max(len(t) for t, _ in anchor))
    augment_length = _bucket(max(len(t) for t, _ in augment))
    self.augment_slots = augment_cache_length or augment_length + 4 * max_decode_len
    self._prefill, self._extend_augment, self._extend = _aligned_fns(
        model, own[0], length + max_decode_len, self.augment_slots)
    self._stream = AugmentStream(
        jnp.asarray(_pad_rows([t for t, _ in augment], augment_length)),
        jnp.asarray(_pad_rows([k for _, k in augment], augment_length)),
        jnp.asarray(_pad_rows([k for _, k in anchor], length)),
        prompt_mask=jnp.asarray(_pad_rows([np.ones(len(t)) for t, _ in augment],
                                          augment_length)))
    self._tokens = jnp.asarray(_pad_rows([t for t, _ in anchor], length))
    self._prompt_mask = jnp.asarray(_pad_rows([np.ones(len(t)) for t, _ in anchor], length))
    self.positions = np.asarray([len(t) for t, _ in anchor], np.int32)
    self.cache = None

  def start(self) -> Array:
    """Prefills the prompts; returns the logits [B, V] (on device) of each row's next token."""
    out = self._prefill(self.params, self._tokens, self._prompt_mask, self._stream)
    self.cache = out.cache
    return out.logits[:, 0]

  def reorder(self, index: np.ndarray) -> None:
    """Row r becomes a copy of row index[r] (its text, caches and position)."""
    index = np.asarray(index)
    self.rows = [self.rows[i].copy() for i in index]
    take = jnp.asarray(index)
    self.cache = jax.tree.map(lambda x: jnp.take(x, take, axis=0), self.cache)
    self.positions = self.positions[index]

  def step(self, token: np.ndarray, active: np.ndarray) -> Array:
    """Feeds `token` [B] to the active rows (the others' outputs are not read); returns the
    logits [B, V] (on device) of each row's next token."""
    rows, positions, batch = self.rows, self.positions, len(self.rows)
    updates = [row.push(t) if a else None for row, t, a in zip(rows, token, active)]
    width = max([len(u.augment_tokens) for u in updates if u is not None] + [0])
    cache = self.cache
    if width:
      width = _bucket(width)
      new = np.zeros((batch, width), np.int32)
      slots = np.zeros((batch, width), np.int32)
      new_keys = np.full((batch, width), np.iinfo(np.int32).max, np.int32)
      valid = np.zeros(batch, np.int32)
      for r, update in enumerate(updates):
        valid[r] = len(rows[r].augment_ids) + 1
        start = valid[r] if update is None else update.augment_from
        n = 0 if update is None else len(update.augment_tokens)
        slots[r] = start + np.arange(width)
        if n:
          new[r, :n], new_keys[r, :n] = update.augment_tokens, update.augment_keys
      if valid.max() > self.augment_slots:
        raise ValueError(f'the augment needs {valid.max()} cache slots, more than the '
                         f'{self.augment_slots} given (augment_cache_length).')
      cache = self._extend_augment(self.params, jnp.asarray(new), jnp.asarray(slots),
                                   jnp.asarray(new_keys), jnp.asarray(valid), cache)
    # The anchor's step: its new token, and any earlier one whose bridges' reads changed.
    froms = np.asarray([u.anchor_from if u is not None else positions[r]
                        for r, u in enumerate(updates)], np.int32)
    width = _bucket(int((positions - froms).max()) + 1)
    run = np.zeros((batch, width), np.int32)
    run_keys = np.zeros((batch, width), np.int32)
    slots = froms[:, None] + np.arange(width)[None, :]
    for r in range(batch):
      inputs, input_keys = rows[r].anchor_inputs()
      n = positions[r] - froms[r] + 1
      if updates[r] is not None:
        run[r, :n], run_keys[r, :n] = inputs[froms[r]:], input_keys[froms[r]:]
      else:  # A finished row: its step is not read.
        run[r, :n], run_keys[r, :n] = 0, np.iinfo(np.int32).max
    out = self._extend(self.params, jnp.asarray(run), jnp.asarray(slots), cache,
                       jnp.asarray(run_keys), jnp.asarray(positions - froms))
    self.cache = out.cache
    self.positions = positions + 1
    return out.logits[:, 0]


def generate_aligned(model: nn.Module, params: Any, rows: list[Any], *, max_decode_len: int,
                     eos_id: int, augment_cache_length: int | None = None,
                     return_logits: bool = False, sampling: Sampling = Sampling(),
                     rng: Array | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Cached decoding (greedy or sampled) of a composition whose augment has its own tokenizer.

  Each step: the anchor's new token extends the text (`alignment.DecodingRow.push`); where
  the augment's tokens of the new text differ from those in its cache (a merge across the
  boundary), its KV cache, its bridges' key/value caches and their read keys roll back to the
  last unchanged token and the changed tail is re-run (`Calm.extend_augment`); then the anchor
  runs its step (`Calm.extend`), its bridges reading every augment token whose read key is at
  or below the new token's. Each step's logits equal a full forward pass over the same text.
  The loop runs on the host (tokenization is Python); the model calls are compiled.

  Args:
    model: a `Calm` with one augment in `config.own_tokenizer`.
    params: its parameters.
    rows: one `alignment.DecodingRow` per prompt (updated in place).
    max_decode_len: tokens to generate.
    eos_id: a row stops after the anchor emits it; its later tokens are 0.
    augment_cache_length: slots of the augment's cache (default: its longest prompt + 4 per
      generated token).
    return_logits: also return each step's logits [B, max_decode_len, V] (float32).
    sampling: how each token is picked (greedy by default); step i samples the batch's logits
      with `sample_tokens(jax.random.fold_in(rng, i), ...)`.
    rng: the sampling key (default `jax.random.key(0)`).

  Returns:
    [B, max_decode_len] int32 generated tokens (and the logits).

  Raises:
    ValueError: not exactly one own-tokenizer augment, or an augment cache too short.
  """
  decoder = _AlignedDecoder(model, params, rows, max_decode_len=max_decode_len,
                            augment_cache_length=augment_cache_length)
  rng = jax.random.key(0) if rng is None else rng
  logits = decoder.start()
  batch = len(rows)
  done = np.zeros(batch, bool)
  tokens = np.zeros((batch, max_decode_len), np.int32)
  all_logits = []
  for i in range(max_decode_len):
    if return_logits:
      all_logits.append(np.asarray(logits, np.float32))
    # Tokens are picked on the device: only [B] ids come back to the host each step.
    picked = np.asarray(_sample_fn(sampling)(jax.random.fold_in(rng, i), logits))
    token = np.where(done, 0, picked).astype(np.int32)
    tokens[:, i] = token
    active = ~done
    done = done | (token == eos_id)
    if i == max_decode_len - 1 or done.all():
      break
    logits = decoder.step(token, active)
  if return_logits:
    steps = np.stack(all_logits, axis=1)
    padded = np.zeros((batch, max_decode_len, steps.shape[-1]), np.float32)
    padded[:, :steps.shape[1]] = steps
    return tokens, padded
  return tokens


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def beam_search_aligned(model: nn.Module, params: Any, rows: list[Any], *, max_decode_len: int,
                        eos_id: int, num_beams: int, length_penalty: float = 0.0,
                        augment_cache_length: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Beam search of a composition whose augment has its own tokenizer, as `beam_search` ranks
  beams (sum of log-probabilities; a finished beam continues with padding at no cost; the
  best maximises score / ((5 + length) / 6) ** length_penalty).

  Each beam is a `alignment.DecodingRow` of its own (its text, so its augment tokenization,
  rollbacks and caches are its own); choosing beams copies rows and gathers their caches.

  Args:
    model, params, max_decode_len, eos_id, augment_cache_length: as in `generate_aligned`.
    rows: one `alignment.DecodingRow` per prompt (not changed).
    num_beams: W beams per prompt (W <= vocabulary size).
    length_penalty: alpha of the final choice's length normalisation (0: none).

  Returns:
    ([B, max_decode_len] int32 tokens of each prompt's best beam, [B] its log-probability).
  """
  batch, width = len(rows), num_beams
  decoder = _AlignedDecoder(model, params, rows, max_decode_len=max_decode_len,
                            augment_cache_length=augment_cache_length)
  log_probs = _log_softmax(np.asarray(decoder.start(), np.float32))
  vocab = log_probs.shape[-1]
  if width > vocab:
    raise ValueError(f'num_beams {width} exceeds the vocabulary size {vocab}.')
  decoder.reorder(np.repeat(np.arange(batch), width))  # Every beam starts from its prompt.
  log_probs = np.repeat(log_probs, width, axis=0)
  scores = np.full((batch, width), _NEG_INF, np.float64)
  scores[:, 0] = 0.0
  done = np.zeros((batch, width), bool)
  seqs = np.zeros((batch, width, max_decode_len), np.int32)
  pad_only = np.full(vocab, _NEG_INF)
  pad_only[0] = 0.0
  for i in range(max_decode_len):
    step = np.where(done[:, :, None], pad_only, log_probs.reshape(batch, width, vocab))
    candidates = (scores[:, :, None] + step).reshape(batch, width * vocab)
    top = np.argpartition(-candidates, width - 1, axis=-1)[:, :width]
    order = np.argsort(-np.take_along_axis(candidates, top, axis=-1), axis=-1, kind='stable')
    flat = np.take_along_axis(top, order, axis=-1)
    scores = np.take_along_axis(candidates, flat, axis=-1)
    beam, token = flat // vocab, (flat % vocab).astype(np.int32)
    rows_index = np.arange(batch)[:, None]
    parent_done = done[rows_index, beam]
    done = parent_done | (token == eos_id)
    seqs = seqs[rows_index, beam]
    seqs[:, :, i] = token
    if i == max_decode_len - 1 or done.all():
      break
    decoder.reorder((rows_index * width + beam).reshape(-1))
    # A beam that had finished adds padding and reads nothing new.
    log_probs = _log_softmax(np.asarray(decoder.step(token.reshape(-1),
                                                     ~parent_done.reshape(-1)), np.float32))
  is_eos = seqs == eos_id
  length = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, max_decode_len)
  normalised = scores / ((5.0 + length) / 6.0) ** length_penalty
  best = normalised.argmax(-1)
  return seqs[np.arange(batch), best], scores[np.arange(batch), best].astype(np.float32)


def generate_aligned_texts(model: nn.Module, params: Any, prompts: Sequence[str], *,
                           anchor_vocabulary: Any, augment_vocabulary: Any, max_decode_len: int,
                           batch_size: int, sampling: Sampling = Sampling(), num_beams: int = 1,
                           length_penalty: float = 0.0, seed: int = 0) -> Iterator[np.ndarray]:
  """`generate_aligned` (or, with num_beams > 1, `beam_search_aligned`) over text prompts,
  `batch_size` at a time: yields each batch's [n, max_decode_len] tokens (0 after EOS). Each
  model reads its BOS first where its vocabulary's models do (`vocab.model_bos_id`), as
  `calm_tasks` features do; a prompt is read whole, tokenized by each model's vocabulary.
  Batch k samples with `jax.random.fold_in(jax.random.key(seed), k)`."""
  from calm_jax import alignment  # pylint: disable=g-import-not-at-top
  from calm_jax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  if num_beams > 1 and sampling.temperature > 0:
    raise ValueError('beam search is deterministic: give num_beams > 1 or a temperature, '
                     'not both.')
  anchor_bos = vocab_lib.model_bos_id(anchor_vocabulary)
  augment_bos = vocab_lib.model_bos_id(augment_vocabulary)
  for k, start in enumerate(range(0, len(prompts), batch_size)):
    rows = [alignment.DecodingRow(anchor_vocabulary, augment_vocabulary, prompt,
                                  anchor_bos=anchor_bos, augment_bos=augment_bos)
            for prompt in prompts[start:start + batch_size]]
    if num_beams > 1:
      yield beam_search_aligned(model, params, rows, max_decode_len=max_decode_len,
                                eos_id=anchor_vocabulary.eos_id, num_beams=num_beams,
                                length_penalty=length_penalty)[0]
    else:
      yield generate_aligned(model, params, rows, max_decode_len=max_decode_len,
                             eos_id=anchor_vocabulary.eos_id, sampling=sampling,
                             rng=jax.random.fold_in(jax.random.key(seed), k))
