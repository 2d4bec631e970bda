"""`calm-convert`: Hugging Face checkpoint directory -> calm_jax LM checkpoint.

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

_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'Local Hugging Face checkpoint directory (config.json + safetensors).')
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', None, 'LM checkpoint directory to create (local path or gs://).')
_DTYPE = flags.DEFINE_enum(
    'dtype', None, ['float32', 'bfloat16', 'float16'],
    'Parameter dtype to store; default: the checkpoint\'s own.')
_EXPECT_PRESET = flags.DEFINE_enum(
    'expect_preset', None, sorted(presets.PRESETS),
    'Fail unless the checkpoint has exactly this preset\'s architecture (dtype aside).')


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logs.setup_console_logging()
  expected = presets.get_preset(_EXPECT_PRESET.value) if _EXPECT_PRESET.value else None
  try:
    convert_hf_checkpoint(_HF_DIR.value, _OUTPUT_DIR.value, dtype=_DTYPE.value,
                          expected=expected, log=logging.info)
  except CheckpointError as e:
    sys.exit(f'calm-convert: {e}')
  logging.info('wrote %s', _OUTPUT_DIR.value)


def main():
  """Console-script entry point."""
  flags.mark_flags_as_required(['hf_dir', 'output_dir'])
  app.run(_main)


if __name__ == '__main__':
  main()
