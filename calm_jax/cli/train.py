"""`calm-train` (`python -m calm_jax.cli.train`): `calm_jax.train.train` configured by gin."""

from calm_jax import train as train_lib
from calm_jax.cli import gin_cli


def main():
  """Console-script entry point."""
  gin_cli.gin_main(train_lib.train, denylist=('log',))


if __name__ == '__main__':
  main()
