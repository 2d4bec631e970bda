"""`calm-export` (`python -m calm_jax.cli.export`): `calm_jax.export.export` configured by gin."""

from calm_jax import export as export_lib
from calm_jax.cli import gin_cli


def main():
  """Console-script entry point."""
  gin_cli.gin_main(export_lib.export, denylist=('log',))


if __name__ == '__main__':
  main()
