"""`calm-eval` (`python -m calm_jax.cli.eval`): `calm_jax.eval.evaluate` configured by gin."""

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-eval', module='calm_jax.cli.eval',
    summary=('evaluates CHECKPOINT (an LM checkpoint, a composition run\'s MODEL_DIR or a '
             'composed checkpoint) on a task or mixture with cached greedy decoding through '
             'seqio\'s Evaluator; writes TensorBoard and JSON metrics to EVAL_DIR (default '
             'CHECKPOINT/eval).'),
    run_files=('runs/eval.gin',),
    example="""\
# The composition of the key-value experiment (calm-kv-experiment, EXPERIMENT_DIR=/tmp/calm_kv):
calm-eval --gin_file=runs/eval.gin --gin_file=tasks/kv_arithmetic.gin \\
  --gin.CHECKPOINT="'/tmp/calm_kv/calm'" --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_eval'" \\
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 6, 'targets': 6}" --gin.BATCH_SIZE=250""")


def main():
  """Console-script entry point: `--help` without importing the library, else the run."""
  gin_cli.command_main(COMMAND, 'calm_jax.eval:evaluate')


if __name__ == '__main__':
  main()
