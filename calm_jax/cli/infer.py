"""`calm-infer` (`python -m calm_jax.cli.infer`): `calm_jax.infer.infer` configured by gin."""

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-infer', module='calm_jax.cli.infer',
    summary=('writes the predictions of CHECKPOINT (an LM checkpoint, a composition run or a '
             'composed checkpoint) on a task or mixture as JSONL, one file per task '
             '(INFER_OUTPUT_DIR/{task}-{step:06d}.jsonl); greedy by default, sampling with '
             '--gin.infer.temperature / top_k / top_p, beams with --gin.infer.num_beams.'),
    run_files=('runs/infer.gin',),
    example="""\
# The composed checkpoint calm-export writes from the key-value experiment:
calm-infer --gin_file=runs/infer.gin --gin_file=tasks/kv_arithmetic.gin \\
  --gin.CHECKPOINT="'/tmp/calm_kv/export'" --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_eval'" \\
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 6, 'targets': 6}" \\
  --gin.INFER_OUTPUT_DIR="'/tmp/calm_kv/infer'" --gin.infer.num_examples=500""")


def main():
  """Console-script entry point: `--help` without importing the library, else the run."""
  gin_cli.command_main(COMMAND, 'calm_jax.infer:infer', denylist=('log',))


if __name__ == '__main__':
  main()
