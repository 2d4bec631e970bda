"""End-to-end check of the import path on the CPU, with no download.

Makes a tiny random Hugging Face checkpoint of each family (transformers + torch, the `test`
extra), converts it with `calm-convert`'s code, restores the LM checkpoint, runs a forward pass
and prints how far our logits are from transformers' own:

  python -m calm_jax.convert.demo [--workdir=/tmp/calm_demo] [--families=gemma2,llama]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from calm_jax import checkpoints, logs
from calm_jax.convert import huggingface, tiny_hf
from calm_jax.transformer import Transformer



def check_family(family: str, workdir: str) -> float:
  """Converts a tiny random `family` model and returns max |logit difference| vs transformers."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, tiny_hf.VOCAB - 3, (2, 11))
  mask = np.ones_like(tokens)
  mask[1, 7:] = 0
  model = tiny_hf.make_model(family)
  reference = tiny_hf.reference_logits(model, tokens, mask)
  hf_dir, lm_dir = os.path.join(workdir, family, 'hf'), os.path.join(workdir, family, 'lm')
  tiny_hf.save_model(model, hf_dir)
  huggingface.convert_hf_checkpoint(hf_dir, lm_dir, log=lambda _: None)
  config, params = checkpoints.load_lm(lm_dir)
  logits = Transformer(config).apply({'params': params}, jnp.asarray(tokens),
                                     segment_ids=jnp.asarray(mask)).logits
  return float(np.abs(np.asarray(logits) - reference)[mask.astype(bool)].max())


def run(families: list[str], workdir: str | None = None) -> None:
  """Converts and checks each family, printing one line per family; exits 1 past tolerance."""
  logs.setup_console_logging()
  workdir = workdir or tempfile.mkdtemp(prefix='calm_demo_')
  print(f'{"family":<12} {"max |logits - transformers|":>28} {"seconds":>8}')
  worst = 0.0
  for family in families:
    start = time.perf_counter()
    diff = check_family(family, workdir)
    worst = max(worst, diff)
    print(f'{family:<12} {diff:>28.2e} {time.perf_counter() - start:>8.1f}')
  print(f'checkpoints in {workdir}; worst difference {worst:.2e} '
        f'({"OK" if worst <= 1e-4 else "FAIL"}: tolerance 1e-4)')
  if worst > 1e-4:
    raise SystemExit(1)


def main():
  """The command line (flags defined here, when the program starts)."""
  workdir = flags.DEFINE_string('workdir', None, 'Where to write checkpoints; default: a temp dir.')
  families = flags.DEFINE_list('families', list(tiny_hf.FAMILIES), 'Families to check.')
  app.run(lambda argv: run(families.value, workdir.value))


if __name__ == '__main__':
  main()
