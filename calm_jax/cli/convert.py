"""`calm-convert` (`python -m calm_jax.convert`): a Hugging Face checkpoint or a GGUF file as an
LM checkpoint.

  calm-convert --hf_dir=/ckpt/Llama-3.2-1B --output_dir=gs://bucket/lm/llama3_2_1b \
      [--dtype=bfloat16] [--expect_preset=llama3_2_1b]
  calm-convert --gguf_file=/models/gemma-3-270m-q4_k_m.gguf --output_dir=/tmp/lm/gemma3_270m
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from calm_jax import logs, presets
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-convert', module='calm_jax.convert',
    summary=('converts a local Hugging Face checkpoint directory (config.json and safetensors; '
             'Llama, Mistral, Qwen2/2.5/3, Gemma 1/2/3) or a GGUF file (llama, qwen2, qwen3, '
             'gemma2, gemma3; quantised tensors are dequantised, its tokenizer is written '
             'beside the weights: vocab.model for SentencePiece, vocab.bpe.json for '
             'byte-level BPE) into a calm_jax LM checkpoint '
             '(orbax parameters and the architecture as JSON) that runs load as anchor or '
             'augment.'),
    example="""\
calm-convert --hf_dir=/ckpt/Llama-3.2-1B --output_dir=/tmp/lm/llama3_2_1b \\
  --expect_preset=llama3_2_1b      # optional: refuse any other architecture
calm-convert --gguf_file=/models/gemma-3-270m-q4_k_m.gguf --output_dir=/tmp/lm/gemma3_270m""")


def _define_flags() -> dict[str, Any]:
  """calm-convert's flags (holders by name), defined when the program starts."""
  holders = {
      'hf_dir': flags.DEFINE_string(
          'hf_dir', None, 'Local Hugging Face checkpoint directory (config.json + safetensors).'),
      'gguf_file': flags.DEFINE_string(
          'gguf_file', None, 'Local GGUF file (instead of --hf_dir).'),
      'skip_tokenizer': flags.DEFINE_bool(
          'skip_tokenizer', False, 'GGUF: convert the weights only, not the tokenizer.'),
      'output_dir': flags.DEFINE_string(
          'output_dir', None, 'LM checkpoint directory to create (local path or gs://).'),
      'dtype': flags.DEFINE_enum(
          'dtype', None, ['float32', 'bfloat16', 'float16'],
          'Parameter dtype to store; default: the checkpoint\'s own (float32 for GGUF).'),
      'expect_preset': flags.DEFINE_enum(
          'expect_preset', None, sorted(presets.PRESETS),
          'Fail unless the checkpoint has exactly this preset\'s architecture (dtype aside).'),
  }
  flags.mark_flags_as_required(['output_dir'])
  flags.mark_flags_as_mutual_exclusive(['hf_dir', 'gguf_file'], required=True)
  return holders


def main():
  """Console-script entry point: `--help` without importing the converter, else converts."""
  usage.exit_on_help(COMMAND, _define_flags)
  flag = _define_flags()
  logs.quiet_startup()
  # pylint: disable=g-import-not-at-top
  from calm_jax.checkpoints import CheckpointError
  from calm_jax.convert.gguf_file import convert_gguf_file
  from calm_jax.convert.huggingface import convert_hf_checkpoint

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.setup_console_logging()
    name = flag['expect_preset'].value
    expected = presets.get_preset(name) if name else None
    try:
      if flag['gguf_file'].value:
        convert_gguf_file(flag['gguf_file'].value, flag['output_dir'].value,
                          dtype=flag['dtype'].value, expected=expected,
                          tokenizer=not flag['skip_tokenizer'].value, log=logging.info)
      else:
        convert_hf_checkpoint(flag['hf_dir'].value, flag['output_dir'].value,
                              dtype=flag['dtype'].value, expected=expected, log=logging.info)
    except CheckpointError as e:
      sys.exit(f'calm-convert: {e}')
    logging.info('wrote %s', flag['output_dir'].value)

  app.run(_main)


if __name__ == '__main__':
  main()
