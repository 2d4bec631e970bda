"""SeqIO metric functions of the text tasks, computed by the field's own packages.

  chrf                  corpus chrF with beta 1 (chrF1, the paper's FLORES metric; sacrebleu's
                        default is beta 2, chrF2), character 6-grams, no word n-grams
  bleu                  corpus BLEU, sacrebleu's default 13a tokenisation
  final_number_accuracy exact match of the final number of each prediction with the target's
                        (GSM8K / MGSM), in percent

Each takes (targets, predictions) as seqio passes them (lists of strings) and returns
{name: score}; scores are in percent, as sacrebleu reports them.
"""

from __future__ import annotations

from typing import Sequence

import sacrebleu

from calm_tasks import lowres_formats

CHRF_BETA = 1


def chrf(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus chrF1 of `predictions` against one reference each."""
  metric = sacrebleu.metrics.CHRF(beta=CHRF_BETA)
  return {'chrf': float(metric.corpus_score(list(predictions), [list(targets)]).score)}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU of `predictions` against one reference each."""
  return {'bleu': float(sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score)}


def final_number_accuracy(targets: Sequence[str],
                          predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions whose final number equals the target's final number."""
  if not targets:
    return {'final_number_accuracy': 0.0}
  predicted = [lowres_formats.final_number(p) for p in predictions]
  hits = sum(p is not None and p == lowres_formats.final_number(t)
             for t, p in zip(targets, predicted))
  return {'final_number_accuracy': 100.0 * hits / len(targets)}
