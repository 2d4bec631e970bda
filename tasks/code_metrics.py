"""Metrics of the code domain: pass@k by running programs in calm_jax.sandbox.

  pass_at_k(n, c, k)      the unbiased estimator of Chen et al. 2021 (HumanEval): of n samples
                          of which c pass, the chance that at least one of k drawn without
                          replacement passes: 1 - C(n - c, k) / C(n, k).
  program_metric(...)     a seqio metric_fn: each (target problem, predicted completion) is
                          made a program and run in the sandbox; returns pass@1 (%) and the
                          per-problem results as a `seqio.metrics.Text` of JSON lines, which
                          `calm_jax.eval.ResultsLogger` writes beside the predictions.
  humaneval_pass_at_1, mbpp_pass_at_1: program_metric of each benchmark's program.

chrF / BLEU of code-to-text are `calm_tasks.text_metrics.chrf` / `bleu` (sacrebleu).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import seqio

from calm_jax import eval as eval_lib
from calm_jax import sandbox
from calm_tasks import code_formats

RESULTS = eval_lib.RESULTS_METRIC  # The metric that carries the per-problem results.


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate of one problem with n samples of which c pass (k <= n).

  Raises:
    ValueError: k > n, or c not in [0, n].
  """
  if not 0 < k <= n:
    raise ValueError(f'pass@k needs 0 < k <= n samples; got k={k}, n={n}.')
  if not 0 <= c <= n:
    raise ValueError(f'{c} passing samples of {n}?')
  if n - c < k:
    return 1.0
  # 1 - prod_{i = n-c+1}^{n} (1 - k / i): the ratio of binomials without overflow.
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
  """pass@k (%) over problems, each given as (n samples, c passing)."""
  return 100.0 * float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def program_metric(program: Callable[[Any, str], str], *, limits: sandbox.Limits | None = None,
                   workers: int | None = None) -> Callable[..., dict[str, Any]]:
  """A seqio metric_fn that runs program(target, prediction) for every example in the sandbox.

  Targets are the problems (a task's target postprocessor returns them, with an 'id');
  predictions are the completions. Returns {'pass@1': % passed, RESULTS: Text of one JSON line
  per problem: id, passed, status, reason}.
  """
  def metric(targets: Sequence[Mapping[str, Any]], predictions: Sequence[str]):
    outcomes = sandbox.run_many([program(t, p) for t, p in zip(targets, predictions)],
                                limits or sandbox.Limits(), workers)
    rows = [{'id': t.get('id'), 'passed': o.passed, 'status': o.status, 'reason': o.reason,
             'seconds': round(o.seconds, 3)} for t, o in zip(targets, outcomes)]
    passed = sum(r['passed'] for r in rows)
    return {'pass@1': seqio.metrics.Scalar(100.0 * passed / max(len(rows), 1)),
            RESULTS: seqio.metrics.Text('\n'.join(json.dumps(r) for r in rows))}
  return metric


humaneval_pass_at_1 = program_metric(code_formats.humaneval_program)
mbpp_pass_at_1 = program_metric(code_formats.mbpp_program)
