"""benchmarks/train_step.py on its smallest setting: runs, reports, and shows the step's cost.

No timing is asserted (shared machines are noisy); FLOP counts are deterministic.
"""



def test_small_benchmark(run_benchmark):
  report = run_benchmark('train_step', '--size=small')
  programs = report['programs']
  assert set(programs) == {'anchor_forward', 'composed_forward', 'composition_step',
                           'full_finetune_step', 'naive_masked_step'}
  for row in programs.values():
    assert row['median_s'] > 0 and row['xla_flops'] > 0 and row['analytic_flops'] > 0
  # The compiled composition step computes no frozen-weight gradient: XLA's count is within
  # 3 % of the analytic minimum, while differentiating the whole tree costs about twice that.
  assert 0.97 <= programs['composition_step']['xla_over_analytic'] <= 1.03
  assert programs['naive_masked_step']['xla_flops'] > 1.5 * programs['composition_step'][
      'xla_flops']
  assert 0.97 <= programs['anchor_forward']['xla_over_analytic'] <= 1.03
  assert report['ratios']['full_finetune_step/anchor_forward (analytic_flops)'] == 3.0
  assert report['parameters']['bridges'] > 0
