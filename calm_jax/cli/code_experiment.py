"""`calm-code-experiment` (`python -m calm_jax.cli.code_experiment`): the code experiment,
`calm_tasks.code_experiment.run_experiment`, configured by gin.

A module of its own so that `--help` answers before TensorFlow, JAX and the tasks are imported.
`--seeds=0,1,2` is short for `--gin.code_experiment.run_experiment.seeds=[0, 1, 2]`.
"""

import sys

from calm_jax.cli import gin_cli
from calm_jax.cli import kv_experiment
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-code-experiment', module='calm_jax.cli.code_experiment',
    summary=('runs the code experiment (CALM section 4.3, Table 4) end to end on a CPU, on '
             'the Python standard library: pretrains m_A on the training modules\' code and '
             'm_B on English, composes them on D_C (7 % of the training functions as '
             'code->text and text->code), trains the baselines (m_B fine-tuned on D_C, LoRA '
             'of the bridges\' size) and the random-m_A ablation, scores every model on '
             'code->text of the held-out modules (chrF1, BLEU), HumanEval pass@1 (completions '
             'run in the sandbox) and held-out English and code perplexity, and writes '
             'results.json, results.md and results.png to EXPERIMENT_DIR; a rerun resumes or '
             'skips finished phases. --seeds=0,1,2 runs it once per seed.'),
    run_files=('experiments/code_stdlib.gin', 'experiments/code_stdlib_small.gin'),
    example=('calm-code-experiment --gin_file=experiments/code_stdlib.gin '
             '--gin.EXPERIMENT_DIR="\'/tmp/calm_code\'"'))


def main():
  """Console-script entry point: `--help` without importing the library, else the experiment."""
  sys.argv = kv_experiment.expand_seeds(sys.argv, function='code_experiment.run_experiment',
                                        command=COMMAND.name)
  gin_cli.command_main(COMMAND, 'calm_tasks.code_experiment:run_experiment')


if __name__ == '__main__':
  main()
