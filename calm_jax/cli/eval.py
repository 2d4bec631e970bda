"""`calm-eval` (`python -m calm_jax.cli.eval`): `calm_jax.eval.evaluate` configured by gin."""

from calm_jax import eval as eval_lib
from calm_jax.cli import gin_cli


def main():
  """Console-script entry point."""
  gin_cli.gin_main(eval_lib.evaluate)


if __name__ == '__main__':
  main()
