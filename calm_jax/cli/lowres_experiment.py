"""`calm-lowres-experiment` (`python -m calm_jax.cli.lowres_experiment`): the low-resource-language
experiment, `calm_tasks.lowres_experiment.run_experiment`, configured by gin.

A module of its own so that `--help` answers before TensorFlow, JAX and the tasks are imported.
`--seeds=0,1,2` is short for `--gin.lowres_experiment.run_experiment.seeds=[0, 1, 2]`.
"""

import sys

from calm_jax.cli import gin_cli
from calm_jax.cli import kv_experiment
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-lowres-experiment', module='calm_jax.cli.lowres_experiment',
    summary=('runs the low-resource-language experiment (CALM section 4.2, Tables 2 and 5) '
             'end to end on a CPU, on the Chichewa and English Bibles: pretrains m_A on '
             'Chichewa and m_B on English, composes them on D_C (5 % of the parallel '
             'verses), trains the baselines (m_B fine-tuned on D_C, LoRA of the bridges\' '
             'size) and the ablations (random m_A, m_A as encoder), scores every model on '
             'nya->en of four held-out books (chrF1, BLEU) and on their English perplexity, '
             'and writes results.json, results.md and results.png to EXPERIMENT_DIR; a rerun '
             'resumes or skips finished phases. --seeds=0,1,2 runs it once per seed.'),
    run_files=('experiments/lowres_bible.gin', 'experiments/lowres_bible_small.gin'),
    example=('calm-lowres-experiment --gin_file=experiments/lowres_bible.gin '
             '--gin.EXPERIMENT_DIR="\'/tmp/calm_lowres\'"'))


def main():
  """Console-script entry point: `--help` without importing the library, else the experiment."""
  sys.argv = kv_experiment.expand_seeds(sys.argv, function='lowres_experiment.run_experiment',
                                        command=COMMAND.name)
  gin_cli.command_main(COMMAND, 'calm_tasks.lowres_experiment:run_experiment')


if __name__ == '__main__':
  main()
