"""`calm-train` (`python -m calm_jax.cli.train`): `calm_jax.train.train` configured by gin."""

from calm_jax.cli import gin_cli
from calm_jax.cli import usage

COMMAND = usage.Command(
    name='calm-train', module='calm_jax.cli.train',
    summary=('trains a run in MODEL_DIR: pretrains an LM from scratch (runs/pretrain.gin), '
             'composes frozen LMs by training bridges only (runs/compose.gin), fine-tunes '
             'the anchor (runs/finetune.gin) or trains LoRA adapters on it (runs/lora.gin). '
             'Writes config.gin, checkpoints (a rerun resumes) and TensorBoard summaries; a '
             'pretraining, fine-tuning or LoRA run also writes MODEL_DIR/lm, an LM checkpoint '
             'a composition loads.'),
    run_files=('runs/pretrain.gin', 'runs/compose.gin', 'runs/finetune.gin', 'runs/lora.gin'),
    example="""\
# Pretrain the key-value experiment's anchor m_B (4 layers of width 64) on Numeric-Arithmetic:
calm-train --gin_file=runs/pretrain.gin --gin_file=tasks/kv_arithmetic.gin \\
  --gin_file=experiments/kv_arithmetic.gin --gin.MODEL_CONFIG="@m_b/configs.TransformerConfig()" \\
  --gin.MODEL_DIR="'/tmp/calm_pretrain/m_b'" --gin.MIXTURE_OR_TASK_NAME="'numeric_arithmetic'" \\
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 6, 'targets': 6}" --gin.TRAIN_STEPS=2000""")


def main():
  """Console-script entry point: `--help` without importing the library, else the run."""
  gin_cli.command_main(COMMAND, 'calm_jax.train:train', denylist=('log', 'warn'))


if __name__ == '__main__':
  main()
