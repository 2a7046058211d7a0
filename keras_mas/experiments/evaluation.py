"""Scoring a task sequence: predictions, per-task accuracy, the table.

One plumbing for both runners (`sequential.run_sequence`,
`streaming.run_stream`) and the methods that read a model's outputs (LwF's
targets).
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_mas.core import multi_process
from keras_mas.data import pipelines
from keras_mas.experiments import metrics as metrics_lib

__all__ = ["format_matrix", "predict_logits", "results", "task_accuracies"]

# Per model, its traced inference function (`predict_logits`).
_INFER = weakref.WeakKeyDictionary()


def format_matrix(results):
  """The accuracy matrix and the four metrics as a readable table."""
  matrix = np.asarray(results["accuracy_matrix"])
  size = len(matrix)
  lines = [f"{results['method']} on {results['dataset']} "
           f"({results['recipe']}, {results['scenario']}-incremental): "
           "R[i][j] = accuracy on task j after training task i",
           "after \\ on " + " ".join(f"{f'task {j}':>7}" for j in range(size))]
  for i in range(size):
    lines.append(f"task {i:<6}" + " ".join(f"{a:7.3f}" for a in matrix[i]))
  lines.append(
      f"ACC {results['acc']:.3f}  BWT {results['bwt']:+.3f}  "
      f"FWT {results['fwt']:+.3f}  forgetting {results['forgetting']:.3f}")
  old = results.get("importance_data_accuracy")
  if old:
    # The deployed model's own task: what the new tasks cost it.
    lines.append("accuracy on the importance data: before "
                 f"{old[0]:.3f}" + "".join(
                     f", after task {k} {a:.3f}"
                     for k, a in enumerate(old[1:])))
  return "\n".join(lines)


def task_accuracies(net, sequence, batch_size=32, trained=None):
  """Test accuracy on every task, streamed batch by batch for pipelines.

  Task- and domain-incremental: each task is scored on its own outputs.
  Class-incremental: after training task `trained`, every task is scored
  over all the classes seen so far (and, for a task not yet trained, up to
  its own classes): the model must tell every seen class from every other.
  """
  tasks = sequence.tasks
  seen = (max(t.stop for t in tasks[:trained + 1])
          if trained is not None else 0)
  accuracies = []
  for task, batches in zip(tasks, _test_batches(net, sequence, batch_size)):
    start, stop = task.start, task.stop
    if sequence.scenario == "class":
      stop = max(stop, seen)
    correct = count = 0
    for logits, y in batches:
      predicted = start + np.argmax(logits[:, start:stop], axis=-1)
      correct += int(np.sum(predicted == y + task.label_offset + task.start))
      count += len(y)
    accuracies.append(correct / count if count else float("nan"))
  return accuracies


def _test_batches(net, sequence, batch_size):
  """Per task, its `(logits, labels)` test batches.

  Array tasks: one `predict` over every test set (one call, not one per
  task). Streaming tasks: batch by batch, never held whole.
  """
  tasks = sequence.tasks
  if not sequence.streaming:
    logits = predict_logits(net, np.concatenate([t.x_test for t in tasks]),
                            batch_size)
    return [[(task_logits, task.y_test)] for task, task_logits in zip(
        tasks, np.split(logits,
                        np.cumsum([len(t.x_test) for t in tasks])[:-1]))]
  # tf.data's batching costs grow with the batch size asked for, the
  # model's calls are cheap: small batches (benchmarks/CHOICES.md).
  step = min(_prediction_batch(sequence.input_shape, batch_size),
             max(batch_size, 256))
  return [((predict_logits(net, x, batch_size), y)
           for x, y in pipelines.evaluation_batches(t.test_data, step,
                                                    t.label_check))
          for t in tasks]


def predict_logits(net, x, batch_size=32):
  """`net`'s outputs on the array `x`, in batches bounded by input size.

  Without a distribution strategy, through one traced call kept with the
  model: `predict`'s own traced function is discarded by every `compile`
  and costs a retrace (and a data pipeline) per evaluation; evaluations run
  after every task of a sequence.
  """
  if (getattr(net, "_distribute_strategy", None) is not None
      or getattr(net, "preprocessor", None) is not None):
    return net.predict(x, batch_size=max(batch_size, 256), verbose=0)
  if keras.backend.backend() == "jax":
    return _jax_predict_logits(net, x, batch_size)
  if keras.backend.backend() == "torch":
    return _eager_predict_logits(net, x, batch_size)
  infer = _INFER.get(net)
  if infer is None:
    model = weakref.ref(net)  # The cache must not keep the model alive.
    infer = tf.function(lambda inputs: model()(inputs, training=False),
                        reduce_retracing=True)
    _INFER[net] = infer
  step = _prediction_batch(x.shape[1:], batch_size)
  if len(x) <= step:
    return infer(tf.constant(x)).numpy()
  return np.concatenate([infer(tf.constant(x[i:i + step])).numpy()
                         for i in range(0, len(x), step)])


def _jax_predict_logits(net, x, batch_size):
  """`predict_logits` on JAX: one `jax.jit` of `stateless_call` kept with
  the model, the variables' current values passed in at every call (read
  inside the trace, they would be compiled in as constants)."""
  import jax  # pylint: disable=g-import-not-at-top

  infer = _INFER.get(net)
  if infer is None:
    model = weakref.ref(net)  # The cache must not keep the model alive.
    infer = jax.jit(lambda trainable, non_trainable, inputs: model(
        ).stateless_call(trainable, non_trainable, inputs, training=False)[0])
    _INFER[net] = infer
  trainable = [v.value for v in net.trainable_variables]
  non_trainable = [v.value for v in net.non_trainable_variables]
  step = _prediction_batch(x.shape[1:], batch_size)
  # Across processes, outputs sharded over them are gathered.
  return np.concatenate([
      multi_process.whole_value(infer(trainable, non_trainable,
                                      x[i:i + step]))
      for i in range(0, len(x), step)])


def _eager_predict_logits(net, x, batch_size):
  """`predict_logits` on PyTorch: the model called eagerly, no autograd."""
  import torch  # pylint: disable=g-import-not-at-top

  step = _prediction_batch(x.shape[1:], batch_size)
  with torch.no_grad():
    return np.concatenate([
        keras.ops.convert_to_numpy(net(keras.ops.convert_to_tensor(
            x[i:i + step]), training=False))
        for i in range(0, len(x), step)])


def _prediction_batch(input_shape, batch_size):
  # About 4M input values a call (16 MiB of float32), at least the
  # training batch.
  return max(batch_size, (1 << 22) // max(1, int(np.prod(input_shape))))


def results(method, sequence, matrix, baseline, config, **extra):
  """The `results.json` of a run: what both runners report, then `extra`.

  Args:
    method: the method's name.
    sequence: the `TaskSequence` learned.
    matrix: the accuracy matrix `R[i][j]`.
    baseline: the untrained model's accuracy per task.
    config: the run's configuration.
    **extra: the runner's own entries (timings, consolidations, ...).
  """
  matrix = np.asarray(matrix, dtype="float64")
  return {
      "method": method, "dataset": sequence.dataset,
      "recipe": sequence.recipe, "scenario": sequence.scenario,
      "tasks": [t.name for t in sequence.tasks],
      "accuracy_matrix": matrix.tolist(), "baseline": list(baseline),
      **metrics_lib.summarize(matrix, baseline),
      "config": config, **extra,
  }
