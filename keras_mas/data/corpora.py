"""Text corpora: the tasks of a language model.

A corpus is a folder of files, one kind per folder:

* `.txt` files (continued pretraining): the text is cut into passages at
  blank lines, and paragraphs are joined (or a long one cut at word
  boundaries) into passages of at most `passage_words` words, so that a
  passage fills about one sequence of the model (a word is one token or
  more).
* `.jsonl` files (supervised fine-tuning): one JSON object a line, with a
  string `"prompt"` and a string `"response"`; blank lines are skipped.

`token_batches` turns a part into what a KerasHub causal LM trains on:
`(inputs, next tokens, weights)` from its own preprocessor. Pairs go to a
preprocessor that takes `{"prompts", "responses"}` (Gemma 3's) as they
are (and plain text goes to it as responses to empty prompts); for one that takes plain strings (GPT-2's, Llama's, ...) the prompt
and response are tokenized apart, joined, and the prompt's tokens get
weight 0, so that the loss is the response's, as the first kind does.

A folder holding `train/` and `test/` subfolders keeps that split;
otherwise a seeded tenth of the passages (at least one) is held out for
measuring the next-token loss. Files are read as UTF-8; a file that is not
text (NUL bytes, or not UTF-8) is refused, naming it.

Example:

```python
corpus = keras_mas.data.corpora.load_corpus("/data/news", passage_words=96)
corpus.kind, len(corpus.train), corpus.test[:2]
```
"""

import dataclasses
import json
import os
import weakref

import numpy as np

__all__ = ["Corpus", "KINDS", "is_corpus", "load_corpus", "takes_pairs",
           "token_batches"]

KINDS = {".txt": "text", ".jsonl": "supervised"}
_TEST_FRACTION = 0.1
# Per preprocessor, the input forms it takes (`_takes`).
_FORMS = weakref.WeakKeyDictionary()
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A text corpus split for training and for measuring.

  Attributes:
    name: the folder's name.
    kind: `"text"` (passages of plain text) or `"supervised"` (prompt and
      response pairs).
    train: the training part: an object array of strings (`"text"`), or a
      dict of two such arrays, `"prompts"` and `"responses"`
      (`"supervised"`).
    test: the held-out part, of the same form.
  """
  name: str
  kind: str
  train: object
  test: object

  @property
  def texts(self):
    """The training part as whole texts (a prompt followed by its response):
    what importance is measured on."""
    return _whole(self.train)

  def __len__(self):
    return _size(self.train)


def is_corpus(directory):
  """Whether `directory` holds a corpus: `.txt` or `.jsonl` files directly
  (or in `train/` and `test/`), not class subfolders."""
  if not os.path.isdir(directory):
    return False
  folders = [os.path.join(directory, s) for s in _SPLITS]
  if all(os.path.isdir(f) for f in folders):
    return all(_corpus_files(f) for f in folders)
  return bool(_corpus_files(directory))


def load_corpus(directory, seed=0, passage_words=96, argument="task_dirs"):
  """Reads the corpus in `directory` (see the module's docstring).

  Args:
    directory: the folder.
    seed: seeds the held-out tenth (without `train/` and `test/`).
    passage_words: most words in a passage of a `.txt` corpus.
    argument: the argument errors name.

  Returns:
    A `Corpus`.

  Raises:
    ValueError: naming `argument` and the file, for a missing folder, one
      with no `.txt` or `.jsonl` file (or class subfolders instead), both
      kinds in one folder, a file that is not UTF-8 text, a `.jsonl` line
      that is not an object with string `"prompt"` and `"response"`, or
      fewer than two passages.
  """
  fail = _failure(argument, directory)
  if not os.path.isdir(directory):
    raise fail("a corpus folder of .txt or .jsonl files", "no such folder")
  name = os.path.basename(os.path.normpath(directory))
  folders = [os.path.join(directory, s) for s in _SPLITS]
  if all(os.path.isdir(f) for f in folders):
    (train_kind, train), (test_kind, test) = (
        _read(f, passage_words, fail) for f in folders)
    if train_kind != test_kind:
      raise fail("the same kind of files in train/ and test/",
                 f"{train_kind} in train/, {test_kind} in test/")
    if not _size(train) or not _size(test):
      raise fail("passages in both train/ and test/",
                 f"{_size(train)} and {_size(test)}")
    return Corpus(name, train_kind, train, test)
  kind, passages = _read(directory, passage_words, fail)
  size = _size(passages)
  if size < 2:
    raise fail("two or more passages (a train and a test part)",
               f"{size} passage{'s' * (size != 1)}")
  order = np.random.default_rng(seed).permutation(size)
  n_test = max(1, int(size * _TEST_FRACTION))
  return Corpus(name, kind, _take(passages, order[n_test:]),
                _take(passages, order[:n_test]))


def token_batches(preprocessor, part, batch_size, seed=None,
                  drop_remainder=False, multiple_of=1):
  """A corpus part as batches of `(x, y, sample_weight)` token tensors.

  Args:
    preprocessor: a KerasHub `CausalLMPreprocessor` (the model's).
    part: a `Corpus`'s `train` or `test`.
    batch_size: texts per batch.
    seed: shuffle (reshuffled each epoch, seeded), or None to keep the
      order.
    drop_remainder: leave out the last, smaller batch.
    multiple_of: cut the last batch to a multiple of this many texts (a
      mesh's data-parallel devices, which share every batch equally); the
      texts left out are drawn anew each epoch where `seed` shuffles.

  Returns:
    A `tf.data.Dataset`; `MASModel` takes it as preprocessed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_mas.data import pipelines  # pylint: disable=g-import-not-at-top
  data = tf.data.Dataset.from_tensor_slices(part)
  if seed is not None:
    data = data.shuffle(_size(part), seed=seed, reshuffle_each_iteration=True)
  data = data.take(pipelines.kept_samples(_size(part), batch_size,
                                          multiple_of))
  data = data.batch(batch_size, drop_remainder=drop_remainder)
  pairs = takes_pairs(preprocessor)
  if isinstance(part, dict) and not pairs:
    prepare = lambda pairs: _response_only(preprocessor, pairs)
  elif not isinstance(part, dict) and pairs and not _takes_text(preprocessor):
    # Text as responses to empty prompts: every token weighs.
    prepare = lambda texts: preprocessor(
        {"prompts": tf.fill(tf.shape(texts), ""), "responses": texts})
  else:
    prepare = preprocessor
  return data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
      tf.data.AUTOTUNE)


def takes_pairs(preprocessor):
  """Whether `preprocessor` takes `{"prompts", "responses"}` itself."""
  return _takes(preprocessor, "pairs")


def _takes_text(preprocessor):
  return _takes(preprocessor, "text")


def _takes(preprocessor, form):
  """Whether `preprocessor` takes `form`, found by trying once per
  preprocessor (a KerasHub preprocessor says it no other way)."""
  forms = _FORMS.setdefault(preprocessor, {})
  if form not in forms:
    sample = ({"prompts": ["a"], "responses": ["b"]} if form == "pairs"
              else ["a"])
    try:
      preprocessor(sample)
      forms[form] = True
    except Exception:  # pylint: disable=broad-except
      forms[form] = False
  return forms[form]


def _response_only(preprocessor, pairs):
  """Prompt and response tokenized apart and packed as one sequence; only
  the response's next tokens weigh (a plain `CausalLMPreprocessor`'s
  packing, with the prompt masked out of the weights)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tokenizer, length = preprocessor.tokenizer, preprocessor.sequence_length
  prompts = tokenizer(pairs["prompts"])
  token_ids, padding_mask = preprocessor.packer(
      tf.concat([prompts, tokenizer(pairs["responses"])], axis=1),
      sequence_length=length + 1,
      add_start_value=preprocessor.add_start_token,
      add_end_value=preprocessor.add_end_token)
  start = int(bool(preprocessor.add_start_token
                   and preprocessor.packer.start_value is not None))
  # y[:, j] is token j + 1: a response token once j + 1 is past the prompt.
  first_response = start + tf.cast(prompts.row_lengths(), "int32")
  response = tf.range(1, length + 1)[None, :] >= first_response[:, None]
  x = {"token_ids": token_ids[..., :-1], "padding_mask": padding_mask[..., :-1]}
  return x, token_ids[..., 1:], tf.logical_and(padding_mask[..., 1:], response)


def _failure(argument, directory):
  def fail(expected, received):
    return ValueError(
        f"Invalid value for argument `{argument}`. Expected {expected}. "
        f"Received: {directory!r} with {received}")
  return fail


def _corpus_files(folder):
  return sorted(f for f in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, f))
                and os.path.splitext(f)[1].lower() in KINDS)


def _read(folder, passage_words, fail):
  """`(kind, passages)` of the corpus files directly in `folder`."""
  files = _corpus_files(folder)
  if not files:
    subfolders = sorted(e for e in os.listdir(folder)
                        if os.path.isdir(os.path.join(folder, e)))
    raise fail("a corpus folder of .txt or .jsonl files",
               f"class subfolders {subfolders[:5]} (a classifier's task)"
               if subfolders else "no .txt or .jsonl file")
  kinds = {KINDS[os.path.splitext(f)[1].lower()] for f in files}
  if len(kinds) > 1:
    raise fail("one kind of file in a corpus: .txt (text) or .jsonl "
               "(prompt and response pairs)", "both")
  kind = kinds.pop()
  texts = [_text(os.path.join(folder, f), fail) for f in files]
  if kind == "text":
    passages = [p for t in texts for p in _passages(t, passage_words)]
    return kind, np.array(passages, dtype=object)
  pairs = [pair for f, t in zip(files, texts)
           for pair in _pairs(t, os.path.join(folder, f), fail)]
  return kind, {"prompts": np.array([p for p, _ in pairs], dtype=object),
                "responses": np.array([r for _, r in pairs], dtype=object)}


def _text(path, fail):
  with open(path, "rb") as f:
    data = f.read()
  try:
    if b"\0" in data:
      raise UnicodeDecodeError("utf-8", data, data.index(b"\0"),
                               data.index(b"\0") + 1, "NUL byte")
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise fail("UTF-8 text files",
               f"{os.path.basename(path)!r}, not text (byte {e.start}: "
               f"{e.reason})") from None


def _passages(text, words_per_passage):
  """Paragraphs joined, or cut at word boundaries, to at most
  `words_per_passage` words each."""
  passages, current = [], []
  for paragraph in text.replace("\r\n", "\n").split("\n\n"):
    words = paragraph.split()
    if current and len(current) + len(words) > words_per_passage:
      passages.append(" ".join(current))
      current = []
    for start in range(0, len(words), words_per_passage):
      piece = words[start:start + words_per_passage]
      if len(piece) == words_per_passage:
        passages.append(" ".join(piece))
      else:
        current += piece
  if current:
    passages.append(" ".join(current))
  return passages


def _pairs(text, path, fail):
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise fail("one JSON object a line in .jsonl files",
                 f"{os.path.basename(path)}:{number}, not JSON ({e.msg})"
                 ) from None
    if (not isinstance(record, dict)
        or not isinstance(record.get("prompt"), str)
        or not isinstance(record.get("response"), str)):
      raise fail(
          'lines {"prompt": "...", "response": "..."} in .jsonl files',
          f"{os.path.basename(path)}:{number}: {line.strip()[:80]!r}")
    yield record["prompt"], record["response"]


def _size(part):
  return len(part["prompts"]) if isinstance(part, dict) else len(part)


def _take(part, indices):
  if isinstance(part, dict):
    return {k: v[indices] for k, v in part.items()}
  return part[indices]


def _whole(part):
  if isinstance(part, dict):
    return np.array([p + r for p, r in zip(part["prompts"],
                                           part["responses"])], dtype=object)
  return part
