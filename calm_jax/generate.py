"""Text in, text out (`calm-generate`): prompts through a checkpoint's own tokenizer.

CHECKPOINT is anything `calm_jax.runs.load_checkpoint` accepts that carries a vocabulary: an LM
checkpoint with `vocab.model` (`calm-convert --gguf_file`), a composition run whose anchor has
one, or a composed checkpoint exported with a vocabulary. Prompts are encoded with it, start with
its BOS token where the vocabulary defines one and the model was trained so (a byte-level BPE
vocabulary says whether; `add_bos=False` to omit), and are continued with the KV-cached
decoder: one compiled prefill, then one compiled step per token, so that text can be shown as
it is generated.

  calm-generate --checkpoint=/tmp/lm/gemma3_270m --prompt="The capital of France is" \
      --max_decode_len=32
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Iterator, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import decoding, runs
from calm_jax import vocab as vocab_lib
from calm_jax.checkpoints import CheckpointError


@dataclasses.dataclass
class Completion:
  """One prompt's result.

  Attributes:
    prompt: the prompt text.
    text: the generated continuation (up to EOS, which is not included).
    tokens: the generated token ids (EOS included if it was generated).
    seconds: wall time of the batch this prompt was decoded in, compilation included.
  """

  prompt: str
  text: str
  tokens: list[int]
  seconds: float


class TextGenerator:
  """Generates text from a loaded checkpoint, token by token.

  Args:
    checkpoint: LM checkpoint, composition run or composed checkpoint with a vocabulary.
    max_decode_len: tokens to generate per prompt.
    sampling: greedy by default.
    add_bos: start prompts with the vocabulary's BOS; default: when it has one (and, for a
      byte-level BPE vocabulary, its file says the model reads one).
    seed: PRNG seed of sampling.

  Raises:
    CheckpointError: the checkpoint carries no vocabulary.
  """

  def __init__(self, checkpoint: str, *, max_decode_len: int = 32,
               sampling: decoding.Sampling = decoding.Sampling(), add_bos: bool | None = None,
               seed: int = 0):
    self.loaded = runs.load_checkpoint(checkpoint)
    self.vocabulary = self.loaded.vocabulary
    if self.vocabulary is None:
      raise CheckpointError(
          f'{checkpoint} carries no vocabulary (an LM checkpoint needs vocab.model, as '
          'calm-convert --gguf_file writes; a composed checkpoint needs one exported); use '
          'calm-infer with a task instead.')
    self.max_decode_len = max_decode_len
    self.sampling = sampling
    bos = vocab_lib.defined_bos_id(self.vocabulary)
    # A byte-level BPE vocabulary says whether its model reads BOS first (Qwen's does not).
    by_default = bos is not None and getattr(self.vocabulary, 'add_bos', True)
    self.bos_id = bos if add_bos or (add_bos is None and by_default) else None
    if add_bos and bos is None:
      raise ValueError(f'The vocabulary of {checkpoint} has no BOS token.')
    self.eos_id = self.vocabulary.eos_id
    self.rng = jax.random.key(seed)
    model = self.loaded.model
    self._prefill = jax.jit(
        lambda p, t, m: decoding.prefill(model, p, t, m, max_decode_len))

    def step(params, token, position, cache, i, rng):
      logits, cache = decoding.extend(model, params, token[:, None], position[:, None], cache)
      return decoding.sample_tokens(jax.random.fold_in(rng, i), logits, sampling), cache

    self._step = jax.jit(step, donate_argnums=(3,))

  def encode(self, prompt: str) -> list[int]:
    """The prompt's token ids as the model reads them (BOS first where used)."""
    ids = list(self.vocabulary.encode(prompt))
    return ([self.bos_id] if self.bos_id is not None else []) + ids

  def stream(self, prompts: Sequence[str]) -> Iterator[np.ndarray]:
    """Yields the next token of every prompt ([B] ids; -1 for rows already at EOS), step by
    step, until all rows have emitted EOS or `max_decode_len` tokens."""
    encoded = [self.encode(p) for p in prompts]
    if any(not ids for ids in encoded):
      raise ValueError('An empty prompt needs a BOS token (add_bos).')
    width = max(len(ids) for ids in encoded)
    tokens = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros_like(tokens)
    for row, ids in enumerate(encoded):
      tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
    params = self.loaded.params
    last, logits, cache = self._prefill(params, jnp.asarray(tokens), jnp.asarray(mask))
    token = decoding.sample_tokens(jax.random.fold_in(self.rng, 0), logits, self.sampling)
    done = np.zeros(len(encoded), bool)
    for i in range(self.max_decode_len):
      host = np.where(done, -1, np.asarray(token))
      yield host
      done |= host == self.eos_id
      if done.all() or i + 1 == self.max_decode_len:
        return
      token, cache = self._step(params, token, last + i + 1, cache, i + 1, self.rng)

  def decode(self, tokens: Sequence[int]) -> str:
    """Text of generated ids, up to (without) EOS."""
    ids = [int(t) for t in tokens]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.vocabulary.decode(ids)

  def generate(self, prompts: Sequence[str],
               on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Continues `prompts` in one batch; `on_text(row, new_text)` is called as text appears.

    Text is released once it decodes to whole characters (byte-fallback pieces of one
    character arrive as several tokens).
    """
    start = time.perf_counter()
    out = [[] for _ in prompts]
    shown = [''] * len(prompts)
    for step_tokens in self.stream(prompts):
      for row, token in enumerate(step_tokens.tolist()):
        if token < 0:
          continue
        out[row].append(token)
        if on_text is not None:
          text = self.decode(out[row])
          if len(text) > len(shown[row]) and not text.endswith('\ufffd'):
            on_text(row, text[len(shown[row]):])
            shown[row] = text
    seconds = time.perf_counter() - start
    return [Completion(p, self.decode(t), t, seconds) for p, t in zip(prompts, out)]


def read_prompts(prompts: Sequence[str] = (), prompt_file: str | None = None) -> list[str]:
  """Prompts from the command line and/or a file: one per line of a text file, or the
  "prompt" (or "inputs") field of each line of a `.jsonl` file; blank lines skipped.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: no prompt at all, or a JSONL line without a prompt.
  """
  result = list(prompts)
  if prompt_file:
    path = epath.Path(prompt_file)
    if not path.exists():
      raise FileNotFoundError(f'Prompt file {prompt_file} does not exist.')
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      if prompt_file.endswith('.jsonl'):
        record = json.loads(line)
        text = record.get('prompt', record.get('inputs'))
        if not isinstance(text, str):
          raise ValueError(f'{prompt_file}:{n} has no "prompt" string.')
        result.append(text)
      else:
        result.append(line)
  if not result:
    raise ValueError('No prompts: give --prompt and/or --prompt_file.')
  return result


def generate_to(generator: TextGenerator, prompts: Sequence[str], *, batch_size: int = 1,
                output_file: str | None = None, stream: Callable[[str], None] | None = None,
                log: Callable[[str], None] = logging.info) -> list[Completion]:
  """Generates for every prompt in batches, streaming text of batch-1 runs to `stream`, and
  writes `output_file` (JSONL: prompt, text, tokens) if given, complete or not at all."""
  results = []
  for begin in range(0, len(prompts), batch_size):
    batch = list(prompts[begin:begin + batch_size])
    streaming = stream is not None and len(batch) == 1
    if streaming:
      stream(batch[0])
    done = generator.generate(batch, on_text=(lambda _, text: stream(text)) if streaming
                              else None)
    for completion in done:
      if stream is not None and not streaming:
        stream(completion.prompt + completion.text + '\n')
      elif streaming:
        stream('\n')
    n = sum(len(c.tokens) for c in done)
    log(f'{len(batch)} prompt(s): {n} tokens in {done[0].seconds:.2f}s '
        f'({n / max(done[0].seconds, 1e-9):.1f} tokens/s, compilation included)')
    results.extend(done)
  if output_file:
    path = epath.Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(''.join(json.dumps({'prompt': c.prompt, 'text': c.text, 'tokens': c.tokens},
                                      ensure_ascii=False) + '\n' for c in results))
    tmp.replace(path)
    log(f'wrote {len(results)} completions to {output_file}')
  return results
