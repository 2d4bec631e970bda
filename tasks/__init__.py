"""calm_jax's SeqIO tasks (import name `calm_tasks`): one module per domain.

Importing a domain module (e.g. `calm_tasks.kv_arithmetic`) registers its tasks and mixtures;
importing this package registers nothing.
"""
