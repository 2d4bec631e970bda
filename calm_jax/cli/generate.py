"""`calm-generate` (`python -m calm_jax.cli.generate`): text in, text out, with the checkpoint's
own tokenizer (`calm_jax.generate`).

  calm-generate --checkpoint=/tmp/lm/gemma3_270m --prompt="The capital of France is"
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from calm_jax import logs
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-generate', module='calm_jax.cli.generate',
    summary=('continues text prompts (--prompt, repeatable, and/or --prompt_file: one per line, '
             'or JSONL with a "prompt" field) with an LM checkpoint that carries its tokenizer '
             '(calm-convert --gguf_file writes it), a composition run whose anchor '
             'carries one, or a composed checkpoint exported with a vocabulary. Text is printed '
             'as it is generated (batch 1); --output_file writes JSONL (prompt, text, tokens).'),
    example="""\
calm-generate --checkpoint=/tmp/lm/gemma3_270m --prompt="The capital of France is" \\
  --max_decode_len=32""")


def _define_flags() -> dict[str, Any]:
  """calm-generate's flags (holders by name), defined when the program starts."""
  holders = {
      'checkpoint': flags.DEFINE_string(
          'checkpoint', None, 'LM checkpoint, composition run or composed checkpoint.'),
      'prompt': flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable).'),
      'prompt_file': flags.DEFINE_string(
          'prompt_file', None, 'Prompts: one per line, or .jsonl with a "prompt" field.'),
      'output_file': flags.DEFINE_string(
          'output_file', None, 'Write completions here as JSONL (local or gs://).'),
      'max_decode_len': flags.DEFINE_integer('max_decode_len', 32, 'Tokens per prompt.'),
      'batch_size': flags.DEFINE_integer(
          'batch_size', 1, 'Prompts decoded together (text streams at batch 1).'),
      'temperature': flags.DEFINE_float('temperature', 0.0, '0: greedy; > 0 samples.'),
      'top_k': flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens.'),
      'top_p': flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.'),
      'seed': flags.DEFINE_integer('seed', 0, 'PRNG seed of sampling.'),
      'add_bos': flags.DEFINE_bool(
          'add_bos', None, 'Start prompts with BOS; default: when the vocabulary has one.'),
      'quiet': flags.DEFINE_bool('quiet', False, 'Print nothing but the log lines.'),
  }
  flags.mark_flags_as_required(['checkpoint'])
  return holders


def main():
  """Console-script entry point: `--help` without importing the library, else generates."""
  usage.exit_on_help(COMMAND, _define_flags)
  flag = _define_flags()
  logs.quiet_startup()

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logs.setup_console_logging()
    # pylint: disable=g-import-not-at-top
    from calm_jax import decoding
    from calm_jax import generate
    from calm_jax.checkpoints import CheckpointError
    try:
      prompts = generate.read_prompts(flag['prompt'].value, flag['prompt_file'].value)
      generator = generate.TextGenerator(
          flag['checkpoint'].value, max_decode_len=flag['max_decode_len'].value,
          sampling=decoding.Sampling(temperature=flag['temperature'].value,
                                     top_k=flag['top_k'].value, top_p=flag['top_p'].value),
          add_bos=flag['add_bos'].value, seed=flag['seed'].value)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
      sys.exit(f'calm-generate: {e}')
    logging.info('generating with %s', generator.loaded.description)

    def stream(text):
      sys.stdout.write(text)
      sys.stdout.flush()

    generate.generate_to(generator, prompts, batch_size=flag['batch_size'].value,
                         output_file=flag['output_file'].value,
                         stream=None if flag['quiet'].value else stream)

  app.run(_main)


if __name__ == '__main__':
  main()
