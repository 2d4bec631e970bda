"""`calm-convert` (`python -m calm_jax.convert`): a Hugging Face checkpoint as an LM checkpoint.

  calm-convert --hf_dir=/ckpt/Llama-3.2-1B --output_dir=gs://bucket/lm/llama3_2_1b \
      [--dtype=bfloat16] [--expect_preset=llama3_2_1b]
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

from calm_jax import logs, presets
from calm_jax.checkpoints import CheckpointError
from calm_jax.convert.huggingface import convert_hf_checkpoint

def main():
  """Console-script entry point: defines the flags, then converts."""
  hf_dir = flags.DEFINE_string(
      'hf_dir', None, 'Local Hugging Face checkpoint directory (config.json + safetensors).')
  output_dir = flags.DEFINE_string(
      'output_dir', None, 'LM checkpoint directory to create (local path or gs://).')
  dtype = flags.DEFINE_enum(
      'dtype', None, ['float32', 'bfloat16', 'float16'],
      'Parameter dtype to store; default: the checkpoint\'s own.')
  expect_preset = flags.DEFINE_enum(
      'expect_preset', None, sorted(presets.PRESETS),
      'Fail unless the checkpoint has exactly this preset\'s architecture (dtype aside).')
  flags.mark_flags_as_required(['hf_dir', 'output_dir'])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.setup_console_logging()
    expected = presets.get_preset(expect_preset.value) if expect_preset.value else None
    try:
      convert_hf_checkpoint(hf_dir.value, output_dir.value, dtype=dtype.value,
                            expected=expected, log=logging.info)
    except CheckpointError as e:
      sys.exit(f'calm-convert: {e}')
    logging.info('wrote %s', output_dir.value)

  app.run(_main)


if __name__ == '__main__':
  main()
