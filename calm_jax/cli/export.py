"""`calm-export` (`python -m calm_jax.cli.export`): `calm_jax.export.export` configured by gin."""

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-export', module='calm_jax.cli.export',
    summary=('writes a composed checkpoint (anchor, augments, bridges, configuration and '
             'vocabulary in one directory, EXPORT_DIR) from a composition run, and with '
             'SERVING_PROMPT_LENGTH its generate function through jax.export (symbolic batch '
             'size); --gin.export.saved_model=True adds a TF SavedModel. With a mesh file '
             '(--gin_file=meshes/default.gin) it restores and writes on that mesh, shard by '
             'shard.'),
    run_files=('runs/export.gin',),
    example="""\
# The composition of the key-value experiment (calm-kv-experiment, EXPERIMENT_DIR=/tmp/calm_kv):
calm-export --gin_file=runs/export.gin --gin_file=tasks/kv_arithmetic.gin \\
  --gin.CHECKPOINT="'/tmp/calm_kv/calm'" --gin.EXPORT_DIR="'/tmp/calm_kv/export'" \\
  --gin.MIXTURE_OR_TASK_NAME="'kv_arithmetic_held_out'" --gin.SERVING_PROMPT_LENGTH=12 \\
  --gin.MAX_DECODE_LEN=6""")


def main():
  """Console-script entry point: `--help` without importing the library, else the run."""
  gin_cli.command_main(COMMAND, 'calm_jax.export:export', denylist=('log',))


if __name__ == '__main__':
  main()
