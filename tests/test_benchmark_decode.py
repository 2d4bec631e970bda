"""benchmarks/decode.py on its smallest setting: runs, reports, and sizes the decoding caches.

No timing is asserted (shared machines are noisy); cache sizes and FLOP counts are exact.
"""

import importlib.util

import numpy as np


def test_small_benchmark(repo_root, run_benchmark):
  report = run_benchmark('decode', '--size=small')

  rows = {(r['model'], r['batch'], r['context']): r for r in report['rows']}
  assert report['batches'] == [1, 8, 32] and len(report['contexts']) >= 2
  expected = {(m, b, c) for m in ('anchor', 'composed') for b in report['batches']
              for c in report['contexts']}
  assert set(rows) == expected
  for row in rows.values():
    for key in ('prefill_s', 'step_s', 'generate_s', 'generate_per_token_s'):
      assert row[key] > 0, (key, row)
    assert row['analytic_flops_per_token'] > 0 and row['xla_flops_per_token'] > 0
    assert row['cache_length'] == row['context'] + report['max_decode_len']

  # The anchor's KV cache: keys and values of every layer, float32, per token of each row.
  module = importlib.util.spec_from_file_location('decode', repo_root / 'benchmarks' / 'decode.py')
  decode = importlib.util.module_from_spec(module)
  module.loader.exec_module(decode)
  spec = decode.common.MODELS['small']['anchor']
  anchor_bytes = 2 * spec['num_layers'] * spec['num_kv_heads'] * spec['head_dim'] * 4
  for (model, batch, context), row in rows.items():
    if model == 'anchor':
      assert row['cache_bytes_per_token'] == anchor_bytes
      assert row['cache_bytes_per_token_parts'] == {'anchor': anchor_bytes}
    else:
      assert row['cache_bytes_per_token'] > rows['anchor', batch, context][
          'cache_bytes_per_token']
      assert set(row['cache_bytes_per_token_parts']) == {'anchor', 'augments', 'bridge'}
      assert row['cache_bytes_per_token_parts']['anchor'] == anchor_bytes

  # Composed / anchor: more work per decoded token, and XLA's count agrees with the analytic one.
  assert len(report['ratios']) == len(report['batches']) * len(report['contexts'])
  for ratio in report['ratios']:
    assert ratio['analytic_flops'] > 1 and ratio['xla_flops'] > 1
    np.testing.assert_allclose(ratio['xla_flops'], ratio['analytic_flops'], rtol=0.1)
    assert ratio['cache_bytes_per_token'] > 1
  for row in rows.values():
    assert 0.9 <= row['xla_over_analytic'] <= 1.1, row

  # Bytes per step: the anchor (tied embeddings) reads every parameter once; the composition
  # reads more of both kinds; the cache part grows with the context.
  params = report['parameters']
  for (model, batch, context), row in rows.items():
    read = row['analytic_step_bytes']
    if model == 'anchor':
      assert read['params'] == 4 * params['anchor']  # float32
      assert read['cache'] <= batch * row['cache_length'] * anchor_bytes
    else:
      assert read['params'] > 4 * params['anchor'] and read['cache'] > rows[
          'anchor', batch, context]['analytic_step_bytes']['cache']
  for ratio in report['ratios']:
    np.testing.assert_allclose(ratio['wall_over_bytes'], ratio['step_s'] / ratio['analytic_bytes'])

  # The per-token target's inputs: wall / analytic ratio of every (B, P).
  for ratio in report['ratios']:
    np.testing.assert_allclose(ratio['wall_over_analytic'],
                               ratio['step_s'] / ratio['analytic_flops'])
    assert ratio['analytic_flops_every_slot'] > 1

  # The progress table: both models, blocked and every-slot reads, at every position.
  progress = {(r['model'], r['decode_block_size'], r['position']) for r in report['progress']}
  assert progress == {(m, b, p) for m in ('anchor', 'composed') for b in (256, None)
                      for p in report['progress_positions']}

  # Gemma-2-2B's window layers: 2 (keys, values) x 4 kv heads x 256 dims x 2 bytes per slot,
  # never more than 4096 slots; its global layers one slot per token.
  per_slot = 2 * 4 * 256 * 2
  for row in report['window_cache']['rows']:
    assert row['bytes_per_window_layer'] == per_slot * min(row['length'], 4096)
    assert row['bytes_per_global_layer'] == per_slot * row['length']

  # The sharded decode on 8 emulated devices (benchmarks/decode_sharded.py as a subprocess):
  # every mesh writes the one-device tokens; parameters and cache divide as the rules say.
  sharded = {r['mesh']: r for r in report['sharded']['rows']}
  assert report['sharded']['device_count'] == 8
  assert set(sharded) == {'one device', '1x8x1', '1x4x2', '1x2x4', '1x4x2 fsdp'}
  assert all(r['tokens_equal'] for r in sharded.values())
  one = sharded['one device']
  assert sharded['1x8x1']['params_bytes'] == one['params_bytes']  # Data parallel: replicas.
  assert sharded['1x8x1']['cache_bytes'] * 8 == one['cache_bytes']  # The batch splits 8 ways.
  assert (one['params_bytes'] > sharded['1x4x2']['params_bytes']
          > sharded['1x4x2 fsdp']['params_bytes'])
  assert sharded['1x2x4']['params_bytes'] < sharded['1x4x2']['params_bytes']
  # The small models' 2 key/value heads do not divide a model axis of 4: the cache splits its
  # head dimension there instead, so every mesh holds an eighth of it per device (up to the
  # [B] prompt lengths, split over the batch axes only).
  for mesh in ('1x4x2', '1x2x4'):
    assert sharded[mesh]['cache_bytes'] <= 1.01 * one['cache_bytes'] / 8, mesh
  for row in sharded.values():
    assert row['generate_s'] > 0 and row['temp_bytes'] > 0, row
