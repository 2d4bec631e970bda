"""`calm-infer` (`python -m calm_jax.cli.infer`): `calm_jax.infer.infer` configured by gin."""

from calm_jax import infer as infer_lib
from calm_jax.cli import gin_cli


def main():
  """Console-script entry point."""
  gin_cli.gin_main(infer_lib.infer, denylist=('log',))


if __name__ == '__main__':
  main()
