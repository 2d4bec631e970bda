"""The command lines (console scripts): the only modules of calm_jax that import gin or define
flags. Each program module defines its flags when it starts (`main`), so importing any of them,
or any library module, defines none.

  calm-train    calm_jax.cli.train    (`calm_jax.train.train`)
  calm-eval     calm_jax.cli.eval     (`calm_jax.eval.evaluate`)
  calm-infer    calm_jax.cli.infer    (`calm_jax.infer.infer`)
  calm-export   calm_jax.cli.export   (`calm_jax.export.export`)
  calm-convert  calm_jax.cli.convert  (`calm_jax.convert.huggingface.convert_hf_checkpoint`)

`--help` is answered by `usage` (reading the run files with `gin_files`) before a program
imports the library: these modules import JAX, TensorFlow and SeqIO only inside `main`.
"""
