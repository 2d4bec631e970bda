"""benchmarks/own_tokenizer_step.py on its smallest setting: both steps run and report.

No timing is asserted (shared machines are noisy); FLOP counts are deterministic.
"""


def test_small_benchmark(run_benchmark):
  report = run_benchmark('own_tokenizer_step', '--size=small')
  programs = report['programs']
  assert set(programs) == {'shared_tokenizer_step', 'own_tokenizer_step'}
  for row in programs.values():
    assert row['median_s'] > 0 and row['xla_flops'] > 0
  # The aligned mask is built from keys, not indices: the same matmuls, a little more
  # elementwise work (within 5 % of the shared step's FLOPs).
  assert 1.0 <= report['ratios']['own/shared (xla_flops)'] <= 1.05
