"""benchmarks/vs_torch.py on its smallest setting: both sides compute the same things.

No timing is asserted (shared machines are noisy): the benchmark's own checks say that
calm_jax, reading the torch models' weights through its importer, gives the same logits, loss
and gradients as `transformers` and the benchmark's torch bridges.
"""


def test_small_benchmark_compares_the_same_work(run_benchmark):
  report = run_benchmark('vs_torch', '--size=small', '--runs=1')
  checks = report['checks']
  assert checks['anchor_logits_max_abs_diff'] < 1e-4
  assert checks['anchor_loss_abs_diff'] < 1e-5
  assert checks['anchor_embedding_grad_max_abs_diff'] < 1e-6
  for kind in ('default', 'paper'):
    assert checks[f'{kind}_composition_loss_abs_diff'] < 1e-5
    # The gradient is not tiny, and both sides agree on it far more closely than its size.
    assert checks[f'{kind}_bridge_out_grad_max_abs'] > 1e-4
    assert (checks[f'{kind}_bridge_out_grad_max_abs_diff']
            < 1e-3 * checks[f'{kind}_bridge_out_grad_max_abs'])
  programs = report['programs']
  assert set(programs) == {'anchor_forward', 'anchor_forward_backward',
                           'composition_step_default_bridge', 'composition_step_paper_bridge',
                           'matmul'}
  for row in programs.values():
    for side in ('jax', 'torch'):
      assert 0 < row[side]['min_s'] <= row[side]['median_s']
      assert 0 < row[side]['fraction_of_peak'] <= 1.0 + 1e-9
  assert report['machine']['pinned_cores'] and len(report['machine']['pinned_cores']) == 1
