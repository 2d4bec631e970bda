"""Language modelling over text files with a checkpoint's own tokenizer.

`register_text_lm` registers a SeqIO task whose examples are the lines of text files (local or
`gs://` patterns), tokenized with the vocabulary an LM checkpoint carries (`vocab.model` or
`vocab.bpe.json`, written by `calm-convert --gguf_file`) or with a SentencePiece `.model`
file. It is the task a run over a real pretrained model's own tokens needs: pretraining a small
augment with the anchor's vocabulary, or composing them.

From gin (`gin/tasks/text_lm.gin`):

  calm-train --gin_file=runs/compose.gin --gin_file=tasks/text_lm.gin \
      --gin.TEXT_FILES="'/data/*.txt'" --gin.TEXT_VOCABULARY="'/tmp/lm/gemma3_270m'" ...
"""

from __future__ import annotations

from typing import Sequence

from etils import epath
import seqio
import tensorflow as tf

from calm_jax import vocab as vocab_lib


def vocabulary(vocabulary: str) -> seqio.Vocabulary:
  """The vocabulary of an LM checkpoint directory, or of a SentencePiece `.model` file.

  Raises:
    FileNotFoundError: neither a checkpoint with a vocabulary nor a file.
  """
  path = epath.Path(vocabulary)
  if vocab_lib.has_vocabulary(path):
    return vocab_lib.load_vocabulary(path)
  if path.is_file():
    return seqio.SentencePieceVocabulary(str(path))
  raise FileNotFoundError(f'{vocabulary} is neither an LM checkpoint with '
                          f'{vocab_lib.VOCAB_FILE} or {vocab_lib.BPE_FILE} nor a SentencePiece '
                          'model file.')


def lines_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Text lines (`TextLineDataSource`'s strings) to {'targets': line}, blank lines dropped."""
  dataset = dataset.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
  return dataset.map(lambda line: {'targets': line}, num_parallel_calls=tf.data.AUTOTUNE)


def register_text_lm(name: str = 'text_lm', *, file_pattern: str | Sequence[str],
                     vocabulary_path: str,
                     validation_pattern: str | Sequence[str] | None = None) -> str:
  """Registers (or replaces) an LM task over the lines of text files; returns its name.

  Args:
    name: the task's name (MIXTURE_OR_TASK_NAME).
    file_pattern: glob pattern(s) of the training text files, one example per non-blank line.
    vocabulary_path: an LM checkpoint carrying its vocabulary, or a SentencePiece model file.
    validation_pattern: pattern(s) of the validation split; default: the training files.

  Raises:
    FileNotFoundError: a pattern that matches no file, or no vocabulary at `vocabulary_path`.
  """
  patterns = {'train': file_pattern, 'validation': validation_pattern or file_pattern}
  for split, pattern in patterns.items():
    for p in [pattern] if isinstance(pattern, str) else pattern:
      if not tf.io.gfile.glob(p):
        raise FileNotFoundError(f'{name}: the {split} pattern {p!r} matches no file.')
  features = {'targets': seqio.Feature(vocabulary(vocabulary_path), add_eos=True)}
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.TextLineDataSource(split_to_filepattern=patterns),
      preprocessors=[
          lines_to_targets,
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features)
  return name
