"""`python -m calm_jax.convert` is `calm-convert`."""

from calm_jax.convert.cli import main

main()
