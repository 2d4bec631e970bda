"""Tiny random GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them.

`write_gguf(path, family)` writes a 64-wide model of one of the families calm_jax imports from
GGUF, with a small tokenizer (SentencePiece for Llama 2 and Gemma, GPT-2-style byte-level BPE
for Qwen, and for Llama 3 with `bpe='llama-bpe'`), reproducing llama.cpp's conventions:

- tensors under llama.cpp's names, each projection as its PyTorch [out, in] array;
- the llama family's q/k rows permuted for llama.cpp's interleaved RoPE (`permute_qk`);
- Gemma's norm weights (every tensor named `*norm.weight`) stored as `1 + w`;
- byte-level BPE tokens in GPT-2's byte-to-unicode spelling, with merges, control tokens
  (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), a user-defined `<think>` and unused
  `[PAD<n>]` tokens up to the embedding size, as llama.cpp writes Qwen's;
- every quantisation type the tests cover (F32, Q8_0, Q5_0, Q4_K, Q6_K) across the families.
  The `gguf` package quantises Q8_0 and Q5_0; it implements no quantiser for the K-quants, so
  those tensors are random valid blocks (random bits, small finite fp16 scales), whose meaning is
  whatever a GGUF reader dequantises them to.

Shapes follow what transformers assumes when it loads a GGUF (it reads no head size for Qwen 3,
and neither softcaps nor the query scale for Gemma 2 and 3): Qwen 3 has head_dim 128 (its config
default), Gemma 2 and 3 head_dim 256 (= their default query_pre_attn_scalar), Gemma 2 the softcaps
50 and 30 of its config defaults.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
SPACE = '\u2581'
PAD, EOS, BOS, UNK = 0, 1, 2, 3

# Words whose SentencePiece pieces the tokenizer has (each word's pieces grow one character at a
# time from `▁`, so every piece is the merge of two others), and a few word-internal pieces.
WORDS = ('the', 'cat', 'sat', 'on', 'mat', 'hello', 'world', 'and', 'to', 'in', 'is', 'a',
         'double', 'spaces', 'tabs', 'here', 'new', 'line')
SUFFIXES = ('ing', 'er', 'ed', 'es')
CHARACTERS = 'etaonihsrldcumwbgpy'


@dataclasses.dataclass(frozen=True)
class Family:
  """A tiny model of one GGUF architecture, with the type of each tensor kind."""
  arch: str
  hidden: int = 64
  layers: int = 2
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16
  mlp: int = 256
  rope_base: float = 10_000.0
  tied: bool = True
  # {tensor kind (llama.cpp's name without blk.N. and .weight): GGML type}; unnamed kinds F32.
  types: Mapping[str, Q] = dataclasses.field(default_factory=dict)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # A byte-level BPE tokenizer with this `tokenizer.ggml.pre`; None: SentencePiece.
  bpe: str | None = None

  @property
  def gemma(self) -> bool:
    return self.arch in ('gemma2', 'gemma3')


FAMILIES = {
    # Untied output; attn_output in F32 (its rows are 64 long, too short for a K-quant block).
    'llama': Family('llama', tied=False, types={
        'token_embd': Q.Q8_0, 'output': Q.Q8_0, 'attn_q': Q.Q5_0, 'attn_k': Q.Q5_0,
        'attn_v': Q.Q8_0, 'ffn_gate': Q.Q8_0, 'ffn_up': Q.Q5_0, 'ffn_down': Q.Q4_K}),
    'qwen2': Family('qwen2', rope_base=1_000_000.0, bpe='qwen2', types={
        'token_embd': Q.Q5_0, 'attn_q': Q.Q8_0, 'attn_k': Q.Q8_0, 'attn_v': Q.Q5_0,
        'attn_output': Q.Q5_0, 'ffn_gate': Q.Q5_0, 'ffn_up': Q.Q8_0, 'ffn_down': Q.Q6_K}),
    'qwen3': Family('qwen3', heads=2, kv_heads=1, head_dim=128, rope_base=1_000_000.0,
                    tied=False, bpe='qwen2', types={
        'token_embd': Q.Q8_0, 'output': Q.Q5_0, 'attn_q': Q.Q5_0, 'attn_k': Q.Q8_0,
        'attn_v': Q.Q8_0, 'attn_output': Q.Q4_K, 'ffn_gate': Q.Q8_0, 'ffn_up': Q.Q8_0,
        'ffn_down': Q.Q6_K}),
    'gemma2': Family('gemma2', heads=2, kv_heads=1, head_dim=256, types={
        'token_embd': Q.Q8_0, 'attn_q': Q.Q5_0, 'attn_k': Q.Q5_0, 'attn_v': Q.Q8_0,
        'attn_output': Q.Q4_K, 'ffn_gate': Q.Q8_0, 'ffn_up': Q.Q5_0, 'ffn_down': Q.Q6_K},
        extra={'sliding_window': 4, 'attn_softcap': 50.0, 'final_softcap': 30.0}),
    # Six layers: Gemma 3's pattern makes the sixth a global layer, the others local.
    'gemma3': Family('gemma3', layers=6, heads=2, kv_heads=1, head_dim=256,
                     rope_base=1_000_000.0, types={
        'token_embd': Q.Q5_0, 'attn_q': Q.Q8_0, 'attn_k': Q.Q5_0, 'attn_v': Q.Q5_0,
        'attn_output': Q.Q6_K, 'ffn_gate': Q.Q5_0, 'ffn_up': Q.Q8_0, 'ffn_down': Q.Q4_K},
        extra={'sliding_window': 4}),
}


def tokenizer_pieces() -> tuple[list[str], list[float], list[int]]:
  """(pieces, scores, types) of a small SentencePiece BPE vocabulary, in id order.

  Control <pad> <eos> <bos>, unknown <unk>, the 256 byte pieces, then merged pieces with
  decreasing scores (their merge priority), then single characters below them all.
  """
  pieces = ['<pad>', '<eos>', '<bos>', '<unk>'] + [f'<0x{b:02X}>' for b in range(256)]
  types = [3, 3, 3, 2] + [6] * 256
  merged = [SPACE + SPACE]
  for word in WORDS:
    spelled = SPACE + word
    merged += [spelled[:n] for n in range(2, len(spelled) + 1)]
  for suffix in SUFFIXES:
    merged += [suffix[:n] for n in range(2, len(suffix) + 1)]
  merged = list(dict.fromkeys(merged))
  characters = list(dict.fromkeys(SPACE + CHARACTERS + ''.join(WORDS + SUFFIXES)))
  pieces += merged + characters
  types += [1] * (len(merged) + len(characters))
  scores = [0.0] * 260 + [-float(i) for i in range(1, len(merged) + len(characters) + 1)]
  return pieces, scores, types


VOCAB = len(tokenizer_pieces()[0])
BPE_VOCAB = 400  # The byte-level BPE families' embedding rows (their tokens, padded).
BPE_CONTROL = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
BPE_USER_DEFINED = ('<think>',)
# Byte-level BPE words (merged left to right, with and without GPT-2's space `Ġ`), then
# word-internal pieces and digit runs; a word's merges outrank the pieces', so that applying
# merges and taking a whole word first agree on every word of the list.
BPE_WORDS = WORDS + ("it's", 'naïve')
BPE_PIECES = SUFFIXES + ('12', '123', '456', '  ', '\n\n')


def byte_spelling() -> dict[int, str]:
  """GPT-2's byte-to-unicode spelling: printable Latin-1 bytes as themselves, the others as
  code points from 256 on, in byte order."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  spelling, extra = {}, 0
  for b in range(256):
    if b in printable:
      spelling[b] = chr(b)
    else:
      spelling[b] = chr(256 + extra)
      extra += 1
  return spelling


def bpe_tokenizer() -> tuple[list[str], list[str], list[int]]:
  """(tokens, merges, types) of a small byte-level BPE vocabulary of BPE_VOCAB tokens, in id order.

  The 256 byte tokens ordered by their spelling (so id 0 is '!', as in Qwen and Llama 3), merged
  tokens, the control and user-defined tokens, then unused `[PAD<n>]` tokens.
  """
  spell = byte_spelling()

  def spelled(text):
    return ''.join(spell[b] for b in text.encode('utf-8'))
  tokens = sorted(spell.values())
  merges = []
  for text in [' ' + w for w in BPE_WORDS] + list(BPE_WORDS) + list(BPE_PIECES):
    chars = spelled(text)
    # GPT-2's merges are between tokens: here the first n characters and the next one.
    for n in range(1, len(chars)):
      merged = chars[:n + 1]
      if merged not in tokens:
        merges.append(f'{chars[:n]} {chars[n]}')
        tokens.append(merged)
  types = [1] * len(tokens)
  tokens += list(BPE_CONTROL) + list(BPE_USER_DEFINED)
  types += [3] * len(BPE_CONTROL) + [4] * len(BPE_USER_DEFINED)
  assert len(tokens) <= BPE_VOCAB, (len(tokens), BPE_VOCAB)
  pad = BPE_VOCAB - len(tokens)
  tokens += [f'[PAD{len(tokens) + i}]' for i in range(pad)]
  types += [5] * pad
  return tokens, merges, types


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute` of q/k rows (convert_hf_to_gguf.py)."""
  rows = w.shape[0]
  return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
  """Random valid K-quant blocks for a [rows, cols] tensor: random bits, finite fp16 scales."""
  block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  assert cols % block_elements == 0, (cols, qtype)
  blocks = rng.integers(0, 256, (rows, cols // block_elements, block_bytes), dtype=np.uint8)
  if qtype == Q.Q4_K:  # d, dmin (fp16), scales[12], qs[128]: w = d * sc * q - dmin * m.
    scales = np.stack([rng.uniform(1e-4, 2e-4, blocks.shape[:2]),
                       rng.uniform(5e-4, 1e-3, blocks.shape[:2])], -1).astype(np.float16)
    blocks[..., 0:4] = scales.view(np.uint8).reshape(*blocks.shape[:2], 4)
  elif qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d (fp16): w = d * sc * (q - 32).
    d = rng.uniform(1e-4, 2e-4, blocks.shape[:2]).astype(np.float16)
    blocks[..., 208:210] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
  else:
    raise ValueError(f'No block builder for {qtype.name}.')
  return blocks.reshape(rows, -1)


def raw_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
  """Random bytes of `rows` x `cols` elements of `qtype` with the leading fp16 scale of every
  block set small and finite (for types, like IQ4_NL, the tests only need refused)."""
  block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (rows, cols // block_elements, block_bytes), dtype=np.uint8)
  blocks[..., 0:2] = np.full(blocks.shape[:2], 1e-3, np.float16).view(np.uint8).reshape(
      *blocks.shape[:2], 2)
  return blocks.reshape(rows, -1)


def _add(writer: gguf.GGUFWriter, rng: np.random.Generator, name: str, w: np.ndarray,
         qtype: Q) -> None:
  if qtype == Q.F32:
    writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  elif qtype in (Q.Q4_K, Q.Q6_K):
    writer.add_tensor(name, _k_quant_blocks(rng, *w.shape, qtype), raw_dtype=qtype)
  elif qtype in (Q.Q8_0, Q.Q5_0):
    writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype),
                      raw_dtype=qtype)
  else:
    writer.add_tensor(name, raw_blocks(rng, *w.shape, qtype), raw_dtype=qtype)


def vocab_size(family: str | Family) -> int:
  """The embedding rows (= tokens) of `family`'s fixture."""
  fam = FAMILIES[family] if isinstance(family, str) else family
  return VOCAB if fam.bpe is None else BPE_VOCAB


def _write_tokenizer(writer: gguf.GGUFWriter, family: Family) -> None:
  if family.bpe is not None:
    tokens, merges, types = bpe_tokenizer()
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(family.bpe)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index('<|endoftext|>'))
    writer.add_eos_token_id(tokens.index('<|im_end|>'))
    writer.add_pad_token_id(tokens.index('<|endoftext|>'))
    writer.add_add_bos_token(False)
    return
  pieces, scores, types = tokenizer_pieces()
  if family.gemma:  # llama.cpp writes Gemma's pieces of spaces with real spaces.
    pieces = [' ' * len(p) if p and not p.strip(SPACE) else p for p in pieces]
    pieces[pieces.index(' ')] = SPACE  # ... of two or more spaces only.
  writer.add_tokenizer_model('llama')
  writer.add_token_list(pieces)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(BOS)
  writer.add_eos_token_id(EOS)
  writer.add_unk_token_id(UNK)
  writer.add_pad_token_id(PAD)
  writer.add_add_bos_token(True)
  writer.add_add_space_prefix(not family.gemma)


def write_gguf(path: str | os.PathLike[str], family: str | Family, *, seed: int = 0,
               tokenizer: bool = True, arch: str | None = None,
               types: Mapping[str, Q] | None = None, bpe: str | None = None) -> str:
  """Writes a tiny random model of `family` as a GGUF file at `path`; returns the path.

  Args:
    path: the file to write.
    family: a key of FAMILIES, or a Family.
    seed: the weights' random seed.
    tokenizer: include the tokenizer.ggml.* keys.
    arch: write this `general.architecture` (and metadata prefix) instead of the family's.
    types: tensor types overriding the family's (e.g. {'ffn_gate': Q.IQ4_NL}).
    bpe: a byte-level BPE tokenizer with this pre-tokenizer instead of the family's.
  """
  fam = FAMILIES[family] if isinstance(family, str) else family
  if bpe is not None:
    fam = dataclasses.replace(fam, bpe=bpe)
  kinds = dict(fam.types, **(types or {}))

  def kind_of(name):  # Biases and norms stay F32, as llama.cpp keeps 1-D tensors.
    return kinds.get(name.split('.')[-2], Q.F32) if name.endswith('.weight') else Q.F32
  rng = np.random.default_rng(seed)
  arch = arch or fam.arch
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  writer.add_name(f'tiny-{fam.arch}')
  writer.add_context_length(128)
  writer.add_embedding_length(fam.hidden)
  writer.add_block_count(fam.layers)
  writer.add_feed_forward_length(fam.mlp)
  writer.add_head_count(fam.heads)
  writer.add_head_count_kv(fam.kv_heads)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_rope_freq_base(fam.rope_base)
  if fam.arch == 'llama':
    writer.add_rope_dimension_count(fam.head_dim)
  else:
    writer.add_key_length(fam.head_dim)
    writer.add_value_length(fam.head_dim)
  if 'sliding_window' in fam.extra:
    writer.add_sliding_window(fam.extra['sliding_window'])
  if 'attn_softcap' in fam.extra:
    writer.add_attn_logit_softcapping(fam.extra['attn_softcap'])
  if 'final_softcap' in fam.extra:
    writer.add_final_logit_softcapping(fam.extra['final_softcap'])
  if tokenizer:
    _write_tokenizer(writer, fam)

  def normal(*shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def norm(size):
    # The stored values, around 1 either way: HF's weight (llama, qwen), or 1 + HF's weight
    # (Gemma's HF norm weights are around 0 and llama.cpp stores them plus one).
    return np.float32(1.0) + normal(size, scale=0.1)

  def add(name, w):
    _add(writer, rng, name, w, kind_of(name))

  q_rows, kv_rows = fam.heads * fam.head_dim, fam.kv_heads * fam.head_dim
  rows = vocab_size(fam)
  add('token_embd.weight', normal(rows, fam.hidden, scale=0.5))
  add('output_norm.weight', norm(fam.hidden))
  if not fam.tied:
    add('output.weight', normal(rows, fam.hidden, scale=0.2))
  for i in range(fam.layers):
    b = f'blk.{i}.'
    add(b + 'attn_norm.weight', norm(fam.hidden))
    q = normal(q_rows, fam.hidden, scale=0.3)
    k = normal(kv_rows, fam.hidden, scale=0.3)
    if fam.arch == 'llama':
      q, k = permute_qk(q, fam.heads), permute_qk(k, fam.kv_heads)
    add(b + 'attn_q.weight', q)
    add(b + 'attn_k.weight', k)
    add(b + 'attn_v.weight', normal(kv_rows, fam.hidden, scale=0.2))
    add(b + 'attn_output.weight', normal(fam.hidden, q_rows, scale=0.1))
    if fam.arch == 'qwen2':
      add(b + 'attn_q.bias', normal(q_rows, scale=0.1))
      add(b + 'attn_k.bias', normal(kv_rows, scale=0.1))
      add(b + 'attn_v.bias', normal(kv_rows, scale=0.1))
    if fam.arch in ('qwen3', 'gemma3'):
      add(b + 'attn_q_norm.weight', norm(fam.head_dim))
      add(b + 'attn_k_norm.weight', norm(fam.head_dim))
    if fam.gemma:
      add(b + 'post_attention_norm.weight', norm(fam.hidden))
      add(b + 'post_ffw_norm.weight', norm(fam.hidden))
    add(b + 'ffn_norm.weight', norm(fam.hidden))
    add(b + 'ffn_gate.weight', normal(fam.mlp, fam.hidden, scale=0.2))
    add(b + 'ffn_up.weight', normal(fam.mlp, fam.hidden, scale=0.2))
    add(b + 'ffn_down.weight', normal(fam.hidden, fam.mlp, scale=0.1))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return os.fspath(path)
