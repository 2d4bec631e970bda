"""Nothing silent at first contact: help, a clean healthy run, gin mistakes and prompts named."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import gin
import numpy as np
import pytest

from calm_jax import composed
from calm_jax.cli import gin_cli
from calm_jax.cli import gin_files
from calm_jax.cli import train as train_cli
from calm_tasks.vocabularies import WordVocabulary

from test_calm import VOCAB, init, make_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# absl / glog error and fatal lines (`E1201 22:25:20.76 ...`, `E0000 00:00:...`), Python's.
ERROR_LINE = re.compile(r'^(?:[EF]\d{4} |ERROR|CRITICAL|Traceback)', re.MULTILINE)


def _python(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                        env=env, cwd=cwd or REPO, check=False)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# --- 1. --help ---------------------------------------------------------------------------------

HELP = {
    'calm_jax.cli.train': ('calm-train', [r'MODEL_DIR\s+REQUIRED', r'TRAIN_STEPS\s+REQUIRED',
                                          r'MIXTURE_OR_TASK_NAME\s+REQUIRED',
                                          r'TASK_FEATURE_LENGTHS\s+REQUIRED',
                                          r'BATCH_SIZE\s+default 32',
                                          r'ANCHOR_CHECKPOINT\s+REQUIRED', 'runs/compose.gin',
                                          'runs/finetune.gin', 'runs/lora.gin',
                                          r'LEARNING_RATE\s+default 1e-4']),
    'calm_jax.cli.eval': ('calm-eval', [r'CHECKPOINT\s+REQUIRED', r'BATCH_SIZE\s+default 64',
                                        r'EVAL_DIR\s+default None']),
    'calm_jax.cli.infer': ('calm-infer', [r'INFER_OUTPUT_DIR\s+REQUIRED']),
    'calm_jax.cli.export': ('calm-export', [r'EXPORT_DIR\s+REQUIRED',
                                            r'MAX_DECODE_LEN\s+default 32']),
    'calm_jax.convert': ('calm-convert', ['--hf_dir', '--gguf_file', 'skip_tokenizer',
                                          '--expect_preset', 'llama3_2_1b']),
    'calm_jax.cli.generate': ('calm-generate', ['--checkpoint', '--prompt_file',
                                                '--output_file', '--max_decode_len']),
    'calm_jax.cli.kv_experiment': ('calm-kv-experiment', [r'EXPERIMENT_DIR\s+REQUIRED',
                                                          r'VOCAB_SIZE\s+default 517',
                                                          'kv_arithmetic_small.gin']),
    'calm_jax.cli.lowres_experiment': ('calm-lowres-experiment', [
        r'EXPERIMENT_DIR\s+REQUIRED', r'VOCAB_SIZE\s+default 2000', 'lowres_bible_small.gin',
        'held-out books']),
    'calm_jax.cli.code_experiment': ('calm-code-experiment', [
        r'EXPERIMENT_DIR\s+REQUIRED', r'VOCAB_SIZE\s+default 4000', 'code_stdlib_small.gin',
        'HumanEval']),
}


@pytest.mark.parametrize('module', sorted(HELP))
def test_help_says_what_a_command_does_and_exits_0(module):
  name, patterns = HELP[module]
  result = _python('-m', module, '--help')
  assert result.returncode == 0, result.stderr[-3000:]
  text = result.stdout
  assert text.startswith(f'{name} (python -m ')
  for pattern in patterns:
    assert re.search(pattern, text), (pattern, text)
  example = text.split('Example:\n', 1)[1]
  assert re.search(rf'^\s+{name} --', example, re.MULTILINE), example
  if name not in ('calm-convert', 'calm-generate'):  # Flags only, no gin.
    assert '--gin_file' in text and '--gin.NAME=VALUE' in text


def test_short_and_full_help_exit_0():
  short = _python('-m', 'calm_jax.cli.train', '-h')
  assert short.returncode == 0, short.stderr[-3000:]
  assert 'MODEL_DIR' in short.stdout
  full = _python('-m', 'calm_jax.cli.train', '--gin_file=x.gin', '--helpfull')
  assert full.returncode == 0, full.stderr[-3000:]
  assert '--gin_search_paths' in full.stdout and '--verbosity' in full.stdout  # absl's too.


@pytest.mark.parametrize('module', ['calm_jax.cli.train', 'calm_jax.cli.eval',
                                    'calm_jax.cli.infer', 'calm_jax.cli.export',
                                    'calm_jax.cli.convert', 'calm_jax.cli.kv_experiment',
                                    'calm_jax.cli.generate', 'calm_jax.cli.lowres_experiment',
                                    'calm_jax.cli.code_experiment'])
def test_command_modules_import_no_heavy_library(module):
  """--help is answered before JAX, TensorFlow or SeqIO are imported (seconds each)."""
  result = _python('-c', f'import sys, {module}; '
                   "print(sorted(m for m in ('jax', 'tensorflow', 'seqio', 'calm_jax.train') "
                   'if m in sys.modules))')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == '[]'


def test_run_file_macros_are_read_from_the_text():
  found = {m.name: m for m in gin_files.macros(gin_files.find('runs/pretrain.gin'))}
  assert found['MODEL_DIR'].required and not found['BATCH_SIZE'].required
  assert found['BATCH_SIZE'].value == '32'
  assert 'Rematerialisation' in found['REMAT'].doc
  assert gin_files.includes(gin_files.find('experiments/kv_arithmetic_small.gin')) == [
      'experiments/kv_arithmetic.gin']


# --- 2. A healthy run logs no errors ---------------------------------------------------------

def _example_argv(example: str) -> list[str]:
  """The command of a help example (comment lines dropped, continuation lines joined)."""
  lines = [line for line in example.splitlines() if not line.lstrip().startswith('#')]
  return shlex.split(' '.join(lines).replace('\\ ', ' '))


def test_the_help_example_runs_without_error_lines(tmp_path):
  """calm-train's own example, 3 steps, on the CPU with JAX and TensorFlow left to choose.

  It used to log TensorFlow's failed CUDA probe, libtpu's start-up errors and gin's `Path not
  found` for each relative gin file (here one file is reached through an include).
  """
  argv = _example_argv(train_cli.COMMAND.example)
  assert argv[0] == 'calm-train'
  steps = tmp_path / 'steps.gin'
  steps.write_text("include 'tasks/kv_arithmetic.gin'\nTRAIN_STEPS = 3\n")
  args = [a for a in argv[1:] if not a.startswith(('--gin.TRAIN_STEPS=', '--gin.MODEL_DIR='))]
  args += [f'--gin_file={steps}', f"--gin.MODEL_DIR='{tmp_path / 'run'}'", '--gin.BATCH_SIZE=8']
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')}
  result = _python('-m', 'calm_jax.cli.train', *args, env=env, cwd=tmp_path)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  assert 'step 3/3' in output
  assert (tmp_path / 'run' / 'lm' / 'config.json').exists()
  assert ERROR_LINE.findall(output) == [], output
  assert 'Path not found' not in output


def test_the_error_line_pattern_sees_error_lines():
  """Control: the pattern above matches the lines a run used to print."""
  old = ('I0000 00:00:1 cudart_stub.cc:31] Could not find cuda drivers\n'
         'E0000 00:00:1796163920.760590   31709 cuda_platform.cc:52] failed call to cuInit\n'
         'E1201 22:25:20.761867 140413638351744 resource_reader.py:55] Path not found: x.gin\n')
  assert len(ERROR_LINE.findall(old)) == 2


def test_readme_pretrain_example_fits_its_task(clean_gin):
  """The README's pretrain command builds a model of the toy task's vocabulary (not Gemma's)."""
  import seqio  # pylint: disable=g-import-not-at-top
  lines = (REPO / 'README.md').read_text().splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith('calm-train --gin_file=runs/pretrain.gin'))
  command = [lines[start]]
  while command[-1].endswith('\\'):
    command.append(lines[start + len(command)])
  argv = gin_cli.rewrite_gin_args(shlex.split(' '.join(c.rstrip('\\') for c in command)))
  files = [a.split('=', 1)[1] for a in argv if a.startswith('--gin_file=')]
  bindings = [a.split('=', 1)[1] for a in argv if a.startswith('--gin_bindings=')]
  gin_cli.parse_gin(files, bindings)
  config = gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()
  task = seqio.get_mixture_or_task(gin.query_parameter('%MIXTURE_OR_TASK_NAME'))
  assert config.vocab_size == task.output_features['targets'].vocabulary.vocab_size
  assert config.embed_dim <= 256, config


# --- 3. gin mistakes -------------------------------------------------------------------------

def test_misspelt_macro_is_an_error_naming_the_closest(clean_gin):
  with pytest.raises(gin_cli.GinConfigError,
                     match=r'--gin\.BATCH_SIZ=8 .*%BATCH_SIZ.*did you mean BATCH_SIZE\?'):
    gin_cli.parse_gin(['runs/pretrain.gin'], ['BATCH_SIZ = 8'])


def test_macros_something_uses_are_accepted(clean_gin):
  """Macros of the files, of an included file, and of another binding; scoped ones too."""
  gin_cli.parse_gin(['runs/pretrain.gin', 'meshes/fsdp.gin'],
                    ['BATCH_SIZE = 8', 'MESH_MODEL = 2', 'STEPS = 7',
                     'train_lib.train.log_every = %STEPS'])
  assert gin.query_parameter('%BATCH_SIZE') == 8
  assert gin.query_parameter('%MESH_MODEL') == 2  # Defined in meshes/default.gin (included).
  gin.clear_config()
  with pytest.raises(gin_cli.GinConfigError, match=r'%m_b/STEPS'):
    gin_cli.parse_gin(['runs/pretrain.gin'], ['m_b/STEPS = 3'])


def test_unquoted_string_names_the_binding_and_the_quoted_form(clean_gin):
  with pytest.raises(gin_cli.GinConfigError) as error:
    gin_cli.parse_gin(['runs/pretrain.gin'], ['BATCH_SIZE = 8', 'MODEL_DIR = /path/run'])
  message = str(error.value)
  assert '--gin.MODEL_DIR=/path/run' in message
  assert '''--gin.MODEL_DIR="'/path/run'"''' in message
  gin.clear_config()
  with pytest.raises(gin_cli.GinConfigError, match=r"--gin\.TASK_FEATURE_LENGTHS=\{'inputs': 6"):
    gin_cli.parse_gin([], ['BATCH_SIZE = 8', "TASK_FEATURE_LENGTHS = {'inputs': 6"])


def test_gin_mistakes_through_the_command_line():
  typo = _python('-m', 'calm_jax.cli.eval', '--gin_file=runs/eval.gin', '--gin.BATCH_SIZ=8')
  assert typo.returncode != 0
  assert 'did you mean BATCH_SIZE?' in typo.stderr, typo.stderr[-3000:]
  unquoted = _python('-m', 'calm_jax.cli.eval', '--gin_file=runs/eval.gin',
                     '--gin.CHECKPOINT=/path/run')
  assert unquoted.returncode != 0
  assert '''--gin.CHECKPOINT="'/path/run'"''' in unquoted.stderr, unquoted.stderr[-3000:]


# --- 4. Composed.generate_text ---------------------------------------------------------------

VOCABULARY = WordVocabulary([f'w{i}' for i in range(VOCAB - 3)])


@pytest.fixture(scope='module')
def model():
  config = make_config(zero_init=False)
  return composed.Composed(config, init(config), VOCABULARY)


def test_generate_text_of_one_prompt_is_a_string(model):
  many = model.generate_text(['w4 w5 w6', 'w7'], max_decode_len=3)
  assert isinstance(many, list) and len(many) == 2
  one = model.generate_text('w4 w5 w6', max_decode_len=3)
  assert isinstance(one, str)
  assert one == many[0]


def test_generate_text_of_no_prompts_is_empty(model):
  assert model.generate_text([], max_decode_len=3) == []
  tokens, mask = composed.prompt_arrays([])
  assert tokens.shape == mask.shape == (0, 1)


def test_unknown_words_are_refused_by_name(model):
  assert VOCABULARY.unknown_words('w1 k999 w2 k999 k7') == ['k999', 'k7']
  assert VOCABULARY.unknown_words('w1 w2') == []
  with pytest.raises(ValueError, match=r"outside the vocabulary: k999 \(in 'w1 k999 w2'\)\.$"):
    model.generate_text(['w3', 'w1 k999 w2'], max_decode_len=3)


class _IdVocabulary:
  """A vocabulary with an unk_id but no unknown_words: 'w<i>' is id i + 3, anything else 2."""

  eos_id, unk_id = 1, 2

  def encode(self, text):
    return [int(w[1:]) + 3 if re.fullmatch(r'w\d+', w) else self.unk_id for w in text.split()]

  def decode(self, ids):
    return ' '.join(f'w{i - 3}' for i in ids if i > 2)


def test_unknown_tokens_are_refused_without_unknown_words(model):
  other = composed.Composed(model.config, model.params, _IdVocabulary())
  assert isinstance(other.generate_text('w1 w2', max_decode_len=2), str)
  with pytest.raises(ValueError, match=r"unknown token, id 2.*'w1 \?'"):
    other.generate_text(['w1 w2', 'w1 ?'], max_decode_len=2)


def test_prompt_arrays_layout():
  tokens, mask = composed.prompt_arrays([[5, 6], [7]])
  np.testing.assert_array_equal(tokens, [[0, 5, 6], [0, 7, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0]])
