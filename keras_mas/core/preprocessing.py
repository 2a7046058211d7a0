"""Raw inputs through a model's own preprocessor, as KerasHub tasks take them.

A KerasHub task model (`keras_hub.models.TextClassifier`, `CausalLM`,
`ImageClassifier`, ...) holds a `preprocessor` that turns raw inputs
(strings, images) into what its backbone takes (token ids, padding masks,
resized pixels). Its `fit`, `evaluate` and `predict` batch the raw data and
map the preprocessor over the batches. `MASModel` does the same for a
wrapped model that has a preprocessor, and `consolidate` measures
importance on the preprocessed inputs.
"""

import keras
import tensorflow as tf

__all__ = ["preprocessed"]

_DEFAULT_BATCH_SIZE = 32


def preprocessed(preprocessor, x, y=None, sample_weight=None, batch_size=None,
                 inputs_only=False, shuffle=False):
  """A batched `tf.data` pipeline of `preprocessor` over raw data.

  Args:
    preprocessor: a callable `(x, y=None, sample_weight=None)` returning the
      preprocessed `x`, or `(x, y)`, or `(x, y, sample_weight)` (a KerasHub
      preprocessor).
    x: raw inputs (an array or list of them, e.g. strings), or a batched
      `tf.data.Dataset` of `x`, `(x, y)` or `(x, y, sample_weight)`. A
      dataset whose inputs hold no strings, for a preprocessor that takes
      text, is taken as preprocessed already (token ids made by the
      caller, e.g. with response-only sample weights) and returned as it
      is.
    y: labels, with array `x`.
    sample_weight: sample weights, with array `x`.
    batch_size: batch size for array `x` (default 32); a dataset keeps its
      own.
    inputs_only: drop the labels and weights before preprocessing (for
      `predict`).
    shuffle: shuffle array `x` (reshuffled each epoch) before batching, as
      `fit(shuffle=True)` does.

  Returns:
    A `tf.data.Dataset` of preprocessed batches.

  Raises:
    ValueError: naming the argument, for `y`, `sample_weight` or
      `batch_size` given with a dataset.
  """
  if isinstance(x, tf.data.Dataset):
    for name, value in (("y", y), ("sample_weight", sample_weight),
                        ("batch_size", batch_size)):
      if value is not None:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected None when `x` "
            f"is a tf.data.Dataset (it holds the batches). Received: "
            f"{name}={value!r}")
    dataset = x
    if _token_batches(preprocessor, dataset):
      return dataset
  else:
    if inputs_only:
      y = sample_weight = None
    dataset = tf.data.Dataset.from_tensor_slices(
        keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
    if shuffle:
      dataset = dataset.shuffle(int(dataset.cardinality()),
                                reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size or _DEFAULT_BATCH_SIZE)

  def apply(*element):
    x_, y_, weight = keras.utils.unpack_x_y_sample_weight(
        element[0] if len(element) == 1 else element)
    if inputs_only:
      y_ = weight = None
    return preprocessor(x_, y_, weight) if y_ is not None or (
        weight is not None) else preprocessor(x_)

  return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
      tf.data.AUTOTUNE)


def _token_batches(preprocessor, dataset):
  """Whether `dataset` holds what a text preprocessor makes: its inputs
  hold no strings, as raw text would."""
  if getattr(preprocessor, "tokenizer", None) is None:
    return False
  spec = dataset.element_spec
  inputs = spec[0] if isinstance(spec, tuple) else spec
  return all(s.dtype != tf.string for s in tf.nest.flatten(inputs))
