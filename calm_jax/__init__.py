"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax.

`calm_jax.load_composed(path)` loads a composed checkpoint written by `calm-export`.
"""


def __getattr__(name):
  # Lazy, so that importing a submodule does not import the whole library.
  if name in ('load_composed', 'Composed'):
    from calm_jax import composed  # pylint: disable=g-import-not-at-top
    return getattr(composed, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
