"""calm_jax against PyTorch (`transformers`) on the same models, weights and batch, one thread.

The anchor is a Gemma-shaped `transformers.GemmaForCausalLM` (d256, 8 layers, 4 heads x 64,
MLP 1024, vocabulary 1000 at the `paper` size; SDPA attention), the augment a smaller one (d128,
8 layers, 4 heads x 32, MLP 512). calm_jax reads the same weights through its own importer
(`save_pretrained`, then `calm_jax.convert.huggingface.load_hf_params`), so both sides do the
same work; the benchmark first checks that they compute the same logits, loss and bridge
gradients.

Programs, each timed on both sides, interleaved (one call of each per round), after warm-up:

- anchor_forward: the anchor's logits (torch under `no_grad`).
- anchor_forward_backward: the anchor's mean next-token cross-entropy and its gradient with
  respect to every weight (torch `backward()`; calm_jax `jax.grad`, jitted).
- composition_step: one AdamW step (global-norm clip 1.0) of the bridges only, both models
  frozen. calm_jax: `train_step.make_train_step` on `Calm`. torch: the frozen augment runs
  under `no_grad`, forward hooks keep its residual stream after the connected layers; the
  bridges are a plain module written here, as `calm_jax.bridge.Bridge` computes them
  (projection E -> D, RMSNorm, queries from the RMS-normed anchor state, causal SDPA, W_o),
  added by forward hooks to the anchor's residual stream after the connected layers; the anchor
  runs with gradients for the bridges only (`requires_grad_(False)` on its weights).
- matmul: a 2048^3 float32 matmul on each side: the peak the fractions are taken of.

One thread each: the process pins itself to one core (`os.sched_setaffinity`, as `taskset`
would), XLA runs single-threaded (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`, set before jax is imported) and torch with
`torch.set_num_threads(1)`. JSON: medians and minima per program and side, GFLOP/s from the
analytic FLOPs (`calm_jax.flops`) and XLA's count, and the fraction of the measured peak.

  python benchmarks/vs_torch.py [--size=paper|small] [--runs=N] [--core=K] [--output=PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

# One thread before jax and torch start theirs.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
for _name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
  os.environ[_name] = '1'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from calm_jax import calm as calm_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax import flops, optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.calm import Calm  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.configs import BridgeConfig, CalmConfig  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.convert import hf_config, huggingface  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.losses import cross_entropy_loss  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.train_step import apply_fn_for, init_train_state, make_train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from calm_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = {
    # The configuration of the comparison: batch 8 x 128.
    'paper': dict(anchor=dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                              num_key_value_heads=4, head_dim=64, intermediate_size=1024),
                  augment=dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=4, head_dim=32, intermediate_size=512),
                  vocab=1000, connections=((4, 4), (8, 8)), bridge_heads=(4, 64),
                  batch=8, length=128, runs=7, matmul=2048),
    # Seconds; what the test runs.
    'small': dict(anchor=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, head_dim=32, intermediate_size=128),
                  augment=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16, intermediate_size=64),
                  vocab=128, connections=((1, 1), (2, 2)), bridge_heads=(2, 32),
                  batch=2, length=32, runs=2, matmul=256),
}
BRIDGES = ('default', 'paper')  # With the query / kv RMSNorms, and without (the paper's).


def hf_model(spec: dict, vocab: int, seed: int):
  """A random float32 `GemmaForCausalLM` with SDPA attention."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.GemmaConfig(vocab_size=vocab, max_position_embeddings=1024,
                                    hidden_activation='gelu_pytorch_tanh', rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, **spec)
  config._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  model = transformers.GemmaForCausalLM(config).eval()
  with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w): make them matter.
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.uniform_(-0.5, 0.5)
  return model


def import_weights(model, directory: str):
  """(TransformerConfig, params) of `model` through calm_jax's Hugging Face importer."""
  model.save_pretrained(directory)
  config = hf_config.config_from_hf(huggingface.read_hf_config(directory), dtype='float32')
  params = huggingface.load_hf_params(directory, config)
  return config, jax.tree.map(jnp.asarray, params)


class TorchBridges:
  """The bridges of `calm_jax.bridge.Bridge` in torch, holding calm_jax's bridge parameters,
  hooked into the HF anchor and augment (`attach`)."""

  def __init__(self, bridge_params: dict, connections, norms: bool, eps: float = 1e-6):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.connections, self.norms, self.eps = tuple(connections), norms, eps
    self.params = []
    for j in range(len(self.connections)):
      block = bridge_params['augment'][f'block_{j}']
      p = {name: torch.nn.Parameter(torch.tensor(np.asarray(block[name])))
           for name in ('proj', 'query', 'key', 'value', 'out')}
      if norms:
        p['query_norm'] = torch.nn.Parameter(torch.tensor(np.asarray(
            block['query_norm']['scale'])))
        p['kv_norm'] = torch.nn.Parameter(torch.tensor(np.asarray(block['kv_norm']['scale'])))
      self.params.append(p)
    self.augment_states = {}

  def parameters(self):
    return [p for block in self.params for p in block.values()]

  def _rms(self, x, scale):
    torch = self.torch
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * scale

  def bridge(self, j: int, anchor_states, augment_states):
    """Bridge j's contribution [B, T, D] (causal: position t reads augment positions <= t)."""
    torch, p = self.torch, self.params[j]
    kv = augment_states @ p['proj']
    x = anchor_states
    if self.norms:
      kv = self._rms(kv, p['kv_norm'])
      x = self._rms(x, p['query_norm'])
    q = torch.einsum('btd,dnh->bnth', x, p['query'])
    k = torch.einsum('bsd,dkh->bksh', kv, p['key'])
    v = torch.einsum('bsd,dkh->bksh', kv, p['value'])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.einsum('bnth,nhd->btd', out, p['out'])

  def attach(self, anchor, augment) -> list:
    """Forward hooks: keep the augment's states after each connected layer, add each bridge
    to the anchor's residual stream after its layer. Returns the hook handles."""
    handles = []
    for j, (a, b) in enumerate(self.connections):
      def keep(module, args, output, a=a):
        del module, args
        self.augment_states[a] = output[0] if isinstance(output, tuple) else output

      def add(module, args, output, j=j, a=a):
        del module, args
        h = output[0] if isinstance(output, tuple) else output
        h = h + self.bridge(j, h, self.augment_states[a])
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
      handles.append(augment.model.layers[a - 1].register_forward_hook(keep))
      handles.append(anchor.model.layers[b - 1].register_forward_hook(add))
    return handles


def _torch_loss(torch, logits, targets):
  """Mean cross-entropy of logits [B, T, V] against targets [B, T]."""
  return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1))


def _batch(tokens: np.ndarray) -> dict:
  """T5X features whose loss is `_torch_loss`'s: inputs t predict tokens t + 1."""
  inputs = jnp.asarray(tokens[:, :-1])
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': jnp.asarray(tokens[:, 1:]),
          'decoder_loss_weights': jnp.ones(inputs.shape, jnp.float32)}


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run(size: str, runs: int | None = None) -> dict:
  """Builds both sides, checks they agree, times every program; returns the report."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  spec = SIZES[size]
  runs = runs or spec['runs']
  batch, length = spec['batch'], spec['length']
  anchor_hf = hf_model(spec['anchor'], spec['vocab'], 0)
  augment_hf = hf_model(spec['augment'], spec['vocab'], 1)
  for p in list(anchor_hf.parameters()) + list(augment_hf.parameters()):
    p.requires_grad_(False)
  with tempfile.TemporaryDirectory() as tmp:
    anchor_config, anchor_params = import_weights(anchor_hf, os.path.join(tmp, 'anchor'))
    augment_config, augment_params = import_weights(augment_hf, os.path.join(tmp, 'augment'))
  frozen = {'anchor': anchor_params, 'augments': {'augment': augment_params}}
  tokens = np.random.default_rng(0).integers(1, spec['vocab'], (batch, length + 1))
  features = _batch(tokens)
  tokens_t = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
  full_t = torch.as_tensor(tokens, dtype=torch.long)
  heads, head_dim = spec['bridge_heads']

  programs, checks = {}, {}
  anchor = Transformer(anchor_config)
  jax_forward = jax.jit(lambda p, t: anchor.apply({'params': p}, t).logits)

  def anchor_loss(p, batch_):
    logits = anchor.apply({'params': p}, batch_['decoder_input_tokens']).logits
    return cross_entropy_loss(logits, batch_['decoder_target_tokens'],
                              batch_['decoder_loss_weights']).loss
  jax_grad = jax.jit(jax.value_and_grad(anchor_loss))

  def torch_forward():
    with torch.no_grad():
      return anchor_hf(input_ids=tokens_t).logits

  anchor_train = [p for p in anchor_hf.parameters()]

  def torch_forward_backward():
    for p in anchor_train:
      p.requires_grad_(True)
      p.grad = None
    loss = _torch_loss(torch, anchor_hf(input_ids=tokens_t).logits, full_t[:, 1:])
    loss.backward()
    for p in anchor_train:
      p.requires_grad_(False)
    return loss

  # Same logits, loss and gradient on both sides (the same work).
  ours = np.asarray(jax_forward(anchor_params, features['decoder_input_tokens']))
  checks['anchor_logits_max_abs_diff'] = float(np.abs(ours - torch_forward().numpy()).max())
  loss_j, grads_j = jax_grad(anchor_params, features)
  loss_t = torch_forward_backward()
  checks['anchor_loss_abs_diff'] = abs(float(loss_j) - loss_t.item())
  embed_grad = np.asarray(jax.tree.leaves(grads_j['embedder'])[0])
  checks['anchor_embedding_grad_max_abs_diff'] = float(np.abs(
      embed_grad - anchor_hf.model.embed_tokens.weight.grad.numpy()).max())
  anchor_flops = flops.lm_forward_flops(anchor_config, batch, length)
  programs['anchor_forward'] = dict(
      analytic_flops=anchor_flops,
      xla_flops=common.xla_flops(jax_forward.lower(anchor_params,
                                                   features['decoder_input_tokens']).compile()),
      jax=lambda: jax.block_until_ready(jax_forward(anchor_params,
                                                    features['decoder_input_tokens'])),
      torch=torch_forward)
  programs['anchor_forward_backward'] = dict(
      analytic_flops=3 * anchor_flops,
      xla_flops=common.xla_flops(jax_grad.lower(anchor_params, features).compile()),
      jax=lambda: jax.block_until_ready(jax_grad(anchor_params, features)),
      torch=torch_forward_backward)

  for kind in BRIDGES:
    norms = kind == 'default'
    config = CalmConfig(anchor=anchor_config, augments={'augment': augment_config},
                        bridges={'augment': BridgeConfig(
                            connections=spec['connections'], num_heads=heads,
                            num_kv_heads=heads, head_dim=head_dim, use_query_norm=norms,
                            use_kv_norm=norms, zero_init_out=False)})
    bridges = calm_lib.init_bridge_params(config, jax.random.key(2))
    # Norm scales away from 1, so that a misplaced norm shows in the check.
    bridges = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 if 'scale' in jax.tree_util.keystr(path) else x, bridges)
    optimizer, _ = optim.make_optimizer('adamw', learning_rate=1e-4)
    step = make_train_step(apply_fn_for(Calm(config)), optimizer)
    state = [init_train_state(jax.tree.map(jnp.copy, bridges), optimizer)]
    torch_bridges = TorchBridges(bridges['bridge'], spec['connections'], norms)
    torch_opt = torch.optim.AdamW(torch_bridges.parameters(), lr=1e-4, weight_decay=0.0)
    handles = torch_bridges.attach(anchor_hf, augment_hf)

    def torch_step(torch_bridges=torch_bridges, torch_opt=torch_opt):
      with torch.no_grad():
        augment_hf.model(input_ids=tokens_t)
      logits = anchor_hf(input_ids=tokens_t).logits
      loss = _torch_loss(torch, logits, full_t[:, 1:])
      torch_opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(torch_bridges.parameters(), 1.0)
      torch_opt.step()
      return loss

    def jax_step(step=step, state=state):
      state[0], metrics = step(state[0], frozen, features)
      jax.block_until_ready(metrics)
      return metrics

    # Both sides start from the same bridges: same loss, same gradient (hence the same step).
    apply = apply_fn_for(Calm(config))

    def composed_loss(b):
      logits = apply({**frozen, **b}, features)
      return cross_entropy_loss(logits, features['decoder_target_tokens'],
                                features['decoder_loss_weights']).loss
    loss_j, grad_j = jax.value_and_grad(composed_loss)(bridges)
    with torch.no_grad():
      augment_hf.model(input_ids=tokens_t)
    logits = anchor_hf(input_ids=tokens_t).logits
    loss_t = _torch_loss(torch, logits, full_t[:, 1:])
    loss_t.backward()
    out_grad = np.asarray(grad_j['bridge']['augment']['block_0']['out'])
    checks[f'{kind}_composition_loss_abs_diff'] = abs(float(loss_j) - loss_t.item())
    checks[f'{kind}_bridge_out_grad_max_abs_diff'] = float(np.abs(
        out_grad - torch_bridges.params[0]['out'].grad.numpy()).max())
    checks[f'{kind}_bridge_out_grad_max_abs'] = float(np.abs(out_grad).max())
    compiled = step.lower(state[0], frozen, features).compile()
    programs[f'composition_step_{kind}_bridge'] = dict(
        analytic_flops=flops.composition_step_flops(config, batch, length),
        xla_flops=common.xla_flops(compiled), jax=jax_step, torch=torch_step,
        bridges=torch_bridges)
    for h in handles:  # Attached again around this program's torch calls only.
      h.remove()

  def jax_matmul_fn():
    a = jax.random.normal(jax.random.key(3), (spec['matmul'],) * 2, jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return lambda: jax.block_until_ready(mm(a))
  a_t = torch.randn(spec['matmul'], spec['matmul'])
  programs['matmul'] = dict(analytic_flops=2.0 * spec['matmul'] ** 3,
                            xla_flops=2.0 * spec['matmul'] ** 3, jax=jax_matmul_fn(),
                            torch=lambda: a_t @ a_t)

  def timed(program, side):
    handles = (program['bridges'].attach(anchor_hf, augment_hf)
               if side == 'torch' and 'bridges' in program else [])
    try:
      return _time(program[side])
    finally:
      for h in handles:
        h.remove()

  times = {name: {'jax': [], 'torch': []} for name in programs}
  for program in programs.values():  # Warm-up (calm_jax compiles here).
    for side in ('jax', 'torch'):
      timed(program, side)
  for _ in range(runs):  # Interleaved: one call of each program and side per round.
    for name, program in programs.items():
      for side in ('jax', 'torch'):
        times[name][side].append(timed(program, side))

  report = {'size': size, 'batch': batch, 'length': length, 'runs': runs, 'checks': checks,
            'machine': {'platform': platform.platform(), 'cpu_count': os.cpu_count(),
                        'pinned_cores': sorted(os.sched_getaffinity(0)),
                        'jax': jax.__version__, 'torch': torch.__version__,
                        'transformers': __import__('transformers').__version__},
            'programs': {}}
  for name, program in programs.items():
    row = {'analytic_flops': program['analytic_flops'], 'xla_flops': program['xla_flops']}
    for side in ('jax', 'torch'):
      row[side] = {'median_s': statistics.median(times[name][side]),
                   'min_s': min(times[name][side]), 'times_s': times[name][side]}
      row[side]['gflops_per_s'] = program['analytic_flops'] / row[side]['median_s'] / 1e9
    row['jax_over_torch_median'] = row['jax']['median_s'] / row['torch']['median_s']
    report['programs'][name] = row
  peak = max(report['programs']['matmul'][side]['gflops_per_s'] for side in ('jax', 'torch'))
  report['matmul_peak_gflops_per_s'] = peak
  for row in report['programs'].values():
    for side in ('jax', 'torch'):
      row[side]['fraction_of_peak'] = row[side]['gflops_per_s'] / peak
  return report


def main(argv=None) -> None:
  """Command line: pins one core, runs one size, writes its JSON report and prints a table."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='paper')
  parser.add_argument('--runs', type=int, default=None)
  parser.add_argument('--core', type=int, default=None,
                      help='the core to pin to (default: the last one this process may use)')
  parser.add_argument('--output', default=None,
                      help='JSON path; default benchmarks/results/vs_torch_<size>.json')
  args = parser.parse_args(argv)
  core = args.core if args.core is not None else max(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  report = run(args.size, args.runs)
  output = common.write_report(report, args.output, 'vs_torch', args.size)
  print(f'{"program":<34} {"calm_jax ms":>12} {"torch ms":>10} {"jax/torch":>9} '
        f'{"jax %peak":>9} {"torch %peak":>11}', file=sys.stderr)
  for name, row in report['programs'].items():
    print(f'{name:<34} {row["jax"]["median_s"] * 1e3:12.1f} {row["torch"]["median_s"] * 1e3:10.1f}'
          f' {row["jax_over_torch_median"]:9.3f} {100 * row["jax"]["fraction_of_peak"]:8.1f}%'
          f' {100 * row["torch"]["fraction_of_peak"]:10.1f}%', file=sys.stderr)
  print(f'checks: {report["checks"]}', file=sys.stderr)
  print(f'wrote {output}', file=sys.stderr)


if __name__ == '__main__':
  main()
