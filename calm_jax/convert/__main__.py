"""`python -m calm_jax.convert` is `calm-convert`."""

from calm_jax.cli.convert import main

main()
