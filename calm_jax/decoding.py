"""Decoding. For now the reference: uncached greedy decoding by full forward passes.

It runs one full forward pass per generated token (O(T^2) per sequence): simple and exact, the
baseline that a cached decoder must reproduce.

Layout (T5X decoder-only, prefix LM): the model reads `decoder_input_tokens` = the sequence
shifted right by one with 0 first; `decoder_causal_attention` is 1 on the prompt region of that
input (the 0 and the n prompt tokens), so the logits at input index n predict the first target.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
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
  first = jnp.sum(prompt_mask, axis=1).astype(jnp.int32) - 1  # [B] index of last prompt token.
  positions = jnp.arange(length)[None, :]
  tokens = jnp.where(positions <= first[:, None], input_tokens, 0)
  rows = jnp.arange(batch)

  def body(i, carry):
    tokens, out, done = carry
    cursor = first + i  # [B] input index whose logits predict the i-th new token.
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
