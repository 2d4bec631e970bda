"""`calm-kv-experiment` (`python -m calm_jax.cli.kv_experiment`): the key-value experiment,
`calm_tasks.kv_experiment.run_experiment`, configured by gin.

A module of its own so that `--help` answers before TensorFlow, JAX and the tasks are imported.
"""

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-kv-experiment', module='calm_jax.cli.kv_experiment',
    summary=('runs the key-value arithmetic experiment (CALM section 4.1, Table 1) end to '
             'end on a CPU: pretrains m_A on KV-Substitution and m_B on Numeric-Arithmetic, '
             'composes them (and m_B with an untrained m_A), evaluates all four on held-out '
             'keys and writes results.json, results.md and results.png to EXPERIMENT_DIR; a '
             'rerun resumes or skips finished phases.'),
    run_files=('experiments/kv_arithmetic.gin', 'experiments/kv_arithmetic_small.gin'),
    example=('calm-kv-experiment --gin_file=experiments/kv_arithmetic.gin '
             '--gin.EXPERIMENT_DIR="\'/tmp/calm_kv\'"'))


def main():
  """Console-script entry point: `--help` without importing the library, else the experiment."""
  gin_cli.command_main(COMMAND, 'calm_tasks.kv_experiment:run_experiment')


if __name__ == '__main__':
  main()
