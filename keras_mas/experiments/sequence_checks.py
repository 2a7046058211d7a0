"""Checks of a task sequence run against its data, before any training.

`configs.SequenceRun` checks each setting alone; what depends on the
sequence, the user's model or the importance data is checked here, each
error naming the argument.
"""

import keras
import numpy as np

from keras_mas.experiments import methods

__all__ = ["check_run"]


def check_run(run, sequence, model, importance_data):
  """Raises, naming the argument, unless `run` can learn `sequence`.

  Args:
    run: a `configs.SequenceRun`.
    sequence: the `keras_mas.data.tasks.TaskSequence` to learn.
    model: the user's own `keras.Model` to start from, or None.
    importance_data: as for `sequential.run_sequence`.

  Returns:
    `(x, y)` of `importance_data` (`y` None without labels; both None
    without importance data).

  Raises:
    ValueError: naming the argument, for a model that does not take the
      tasks' inputs or lacks their outputs, options that only an
      architecture takes given with the user's model, a `lora_rank` for a
      model without a KerasHub backbone, labels outside a task's classes,
      more `importance_samples` than a task has, or importance data of
      another shape, without labels its method reads, or labels beyond
      the model's outputs.
  """
  if model is not None:
    _check_model(model, run, sequence)
  _check_lora_rank(run.lora_rank, run.model if model is None else model)
  _check_labels(sequence)
  _check_importance_samples(run.importance_samples, sequence)
  return _check_importance_data(importance_data, sequence,
                                methods.get(run.method), model)


def _check_model(model, run, sequence):
  """Raises unless the user's `model` can serve."""
  if not isinstance(model, keras.Model):
    raise ValueError(
        "Invalid value for argument `model`. Expected the user's built "
        "keras.Model or an architecture name. Received: "
        f"model={model!r}")
  _check_model_fits(model, sequence)
  if run.weights is not None or run.freeze_backbone:
    raise ValueError(
        "Invalid value for argument `weights`/`freeze_backbone`. Expected "
        "them only with a keras.applications backbone. Received: "
        f"model='custom:{model.name}', weights={run.weights!r}, "
        f"freeze_backbone={run.freeze_backbone!r}")


def _check_lora_rank(lora_rank, model):
  """Raises unless `lora_rank` is None or `model` has a KerasHub backbone."""
  if lora_rank is None:
    return
  backbone = getattr(model, "backbone", None)
  if not hasattr(backbone, "enable_lora"):
    raise ValueError(
        "Invalid value for argument `lora_rank`. Expected the user's KerasHub "
        "task model, whose backbone has `enable_lora`. Received: model="
        f"{getattr(model, 'name', model)!r}")


def _check_importance_samples(importance_samples, sequence):
  if importance_samples is None:
    return
  # A pipeline of unknown size is checked when importance reads it.
  smallest = min([t.train_size for t in sequence.tasks
                  if t.train_size is not None] or [importance_samples])
  if (not isinstance(importance_samples, (int, np.integer))
      or not 1 <= importance_samples <= smallest):
    raise ValueError(
        "Invalid value for argument `importance_samples`. Expected an "
        f"integer from 1 to {smallest}, the smallest task's training set. "
        f"Received: importance_samples={importance_samples!r}")


def _check_model_fits(model, sequence):
  """Raises unless `model` takes the tasks' inputs and has their outputs."""
  preprocessor = getattr(model, "preprocessor", None)
  if preprocessor is not None:
    _check_preprocessor_takes(model, preprocessor, sequence)
  elif sequence.text:
    raise ValueError(
        "Invalid value for argument `model`. Expected a model with a "
        "preprocessor that takes text (a KerasHub task such as a "
        "TextClassifier) for tasks of text. Received: model "
        f"{model.name!r} without a preprocessor")
  elif not model.built or len(model.inputs or []) != 1:
    raise ValueError(
        "Invalid value for argument `model`. Expected a built keras.Model "
        "with one image input. Received: "
        f"{'an unbuilt' if not model.built else 'a multi-input'} model "
        f"{model.name!r}")
  expected = tuple(sequence.input_shape)
  taken = (expected if preprocessor is not None else
           tuple(model.inputs[0].shape[1:]))
  if len(taken) != len(expected) or any(
      t is not None and t != e for t, e in zip(taken, expected)):
    raise ValueError(
        "Invalid value for argument `model`. Expected a model taking inputs "
        f"of shape {expected}, the tasks' (resize the data, or pass "
        f"image_size to the source). Received: model {model.name!r} taking "
        f"{taken}")
  outputs = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
  if outputs is None or outputs < sequence.num_outputs:
    raise ValueError(
        "Invalid value for argument `model`. Expected one output of at "
        f"least {sequence.num_outputs} logits, as the "
        f"{sequence.scenario}-incremental sequence needs. Received: model "
        f"{model.name!r} with output shapes "
        f"{[tuple(o.shape) for o in model.outputs]}")


def _check_preprocessor_takes(model, preprocessor, sequence):
  """Raises unless `preprocessor` takes a training input of the first task."""
  task = sequence.tasks[0]
  sample = (next(iter(task.train_data.take(1).batch(1)))[0]
            if task.streaming else task.x_train[:1])
  kind = "text" if sequence.text else "images"
  try:
    preprocessor(sample)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `model`. Expected a model whose "
        f"preprocessor takes the tasks' inputs ({kind}). Received: model "
        f"{model.name!r} with a {type(preprocessor).__name__}, which fails "
        f"on them ({type(e).__name__}: {str(e)[:200]})") from e


def _check_labels(sequence):
  """Raises, naming them, for labels outside a task's classes."""
  for k, task in enumerate(sequence.tasks):
    if task.streaming:
      continue  # Checked by `tasks.from_datasets`, and as they stream.
    for split, y in (("train", task.y_train), ("test", task.y_test)):
      y = np.asarray(y)
      bad = y[(y < 0) | (y >= task.num_classes)] if y.size else y
      if bad.size or y.ndim != 1:
        raise ValueError(
            "Invalid value for argument `sequence`. Expected integer labels "
            f"0..{task.num_classes - 1} in task {k} ({task.name!r}). "
            f"Received: {split} labels "
            + (f"of shape {y.shape}" if y.ndim != 1 else
               f"{sorted(set(bad.tolist()))[:10]} out of range"))


def _check_importance_data(data, sequence, method_spec, model):
  """`(x, y)` of `importance_data` (y may be None), checked before training."""
  if data is None:
    return None, None
  x, y = data if isinstance(data, tuple) else (data, None)
  x = np.asarray(x)
  if (x.ndim != 1 + len(sequence.input_shape) or not len(x)
      or tuple(x.shape[1:]) != tuple(sequence.input_shape)
      or _is_text(x) != sequence.text):
    raise ValueError(
        "Invalid value for argument `importance_data`. Expected inputs of "
        f"the tasks' shape {tuple(sequence.input_shape)}. Received: inputs "
        f"of shape {x.shape}")
  if y is not None:
    y = np.asarray(y)
    outputs = (model.outputs[0].shape[-1] if isinstance(model, keras.Model)
               else sequence.num_outputs)
    if y.shape != (len(x),) or y.min() < 0 or y.max() >= outputs:
      raise ValueError(
          "Invalid value for argument `importance_data`. Expected one label "
          f"per input in 0..{outputs - 1}. Received: labels of shape "
          f"{y.shape}" + (f", range {y.min()}..{y.max()}" if y.size else ""))
  elif method_spec.labels:
    raise ValueError(
        "Invalid value for argument `importance_data`. Expected labels, "
        f"`(inputs, labels)`, for method={method_spec.name!r}, whose "
        "importance reads them. Received: inputs only")
  return (x if sequence.text else x.astype("float32")), y




def _is_text(x):
  return x.dtype == object or x.dtype.kind in "US"
