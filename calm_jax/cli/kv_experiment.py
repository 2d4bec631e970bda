"""`calm-kv-experiment` (`python -m calm_jax.cli.kv_experiment`): the key-value experiment,
`calm_tasks.kv_experiment.run_experiment`, configured by gin.

A module of its own so that `--help` answers before TensorFlow, JAX and the tasks are imported.
`--seeds=0,1,2` is short for `--gin.kv_experiment.run_experiment.seeds=[0, 1, 2]`.
"""

import sys
from typing import Sequence

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-kv-experiment', module='calm_jax.cli.kv_experiment',
    summary=('runs the key-value arithmetic experiment (CALM section 4.1, Table 1) end to '
             'end on a CPU: pretrains m_A on KV-Substitution and m_B on Numeric-Arithmetic, '
             'composes them (and m_B with an untrained m_A), evaluates all four on held-out '
             'keys and writes results.json, results.md and results.png to EXPERIMENT_DIR; a '
             'rerun resumes or skips finished phases. --seeds=0,1,2 runs it once per seed '
             '(training seed and key repository) under EXPERIMENT_DIR/seed_<n> and reports '
             'the mean, standard deviation, min and max of every cell.'),
    run_files=('experiments/kv_arithmetic.gin', 'experiments/kv_arithmetic_small.gin'),
    example=('calm-kv-experiment --gin_file=experiments/kv_arithmetic.gin '
             '--gin.EXPERIMENT_DIR="\'/tmp/calm_kv\'"'))


def expand_seeds(argv: Sequence[str], function: str = 'kv_experiment.run_experiment',
                 command: str = 'calm-kv-experiment') -> list[str]:
  """`argv` with `--seeds=0,1,2` (or `--seeds 0,1,2`) as the gin binding of
  `function.seeds` (the experiment's `run_experiment`).

  Raises:
    SystemExit: the seeds are not comma-separated integers.
  """
  out, args = [], list(argv)
  while args:
    arg = args.pop(0)
    if arg == '--seeds' and args:
      arg = '--seeds=' + args.pop(0)
    if arg.startswith('--seeds='):
      text = arg[len('--seeds='):]
      try:
        seeds = [int(word) for word in text.split(',') if word.strip()]
      except ValueError:
        sys.exit(f'{command}: --seeds takes comma-separated integers, got {text!r}.')
      if not seeds:
        sys.exit(f'{command}: --seeds is empty.')
      arg = f'--gin.{function}.seeds={seeds}'
    out.append(arg)
  return out


def main():
  """Console-script entry point: `--help` without importing the library, else the experiment."""
  sys.argv = expand_seeds(sys.argv)
  gin_cli.command_main(COMMAND, 'calm_tasks.kv_experiment:run_experiment')


if __name__ == '__main__':
  main()
