"""The peer side of benchmarks/peer.py: Avalanche's MAS on Fashion-MNIST.

Runs inside the peer's own virtual environment (Avalanche 0.6.0 and its
PyTorch, set up as benchmarks/PEER.md says), never the project's: it
imports only avalanche, torch and numpy, and nothing of keras_mas. It
rebuilds, from Debian's IDX files, the exact task arrays that
`keras_mas.data.tasks.make_sequence("fashion_mnist", recipe, "domain", 5,
seed)` makes (same class groups, permutations and training shuffles, drawn
from the same NumPy generator in the same order; peer.py checks the
digests), trains the same MLP with Avalanche's `Naive` strategy and its
`MASPlugin`, evaluates every task after each one with Avalanche's own
evaluator, and prints one JSON line: the accuracy matrix and the seconds
spent in each phase.

Usage (peer.py runs it; by hand):

  /work/peer-venv/bin/python benchmarks/peer_avalanche.py --recipe=split

Flags are plain argparse: the peer's venv has no absl.
"""

import time

_STARTED = time.perf_counter()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import argparse
import gzip
import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch import nn

from avalanche.benchmarks.scenarios.dataset_scenario import (
    benchmark_from_datasets)
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset)
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins import MASPlugin
from avalanche.training.supervised import Naive

_IMPORTED = time.perf_counter()

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
  """One IDX file (gzipped or not) as a NumPy array of its shape."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  dtype = np.dtype({0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
                    0x0D: ">f4", 0x0E: ">f8"}[data[2]])
  rank = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data[4:4 + 4 * rank], ">u4"))
  return np.frombuffer(data, dtype, offset=4 + 4 * rank).reshape(shape)


def load_fashion(directory):
  """`(x_train, y_train, x_test, y_test)`: flat float32 images in [0, 1]
  (as keras_mas's loader scales them), int64 labels."""
  def find(stem):
    for name in (stem, stem + ".gz"):
      if os.path.exists(os.path.join(directory, name)):
        return os.path.join(directory, name)
    raise FileNotFoundError(os.path.join(directory, stem))

  def images(stem):
    x = read_idx(find(stem))
    return (x.reshape(len(x), -1).astype("float32") / 255.0)

  def labels(stem):
    return read_idx(find(stem)).astype("int64")

  return (images("train-images-idx3-ubyte"),
          labels("train-labels-idx1-ubyte"),
          images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def make_tasks(source, recipe, num_tasks, seed):
  """The tasks as keras_mas's `make_sequence(..., scenario="domain")` makes
  them: a list of `(x_train, y_train, x_test, y_test)`, labels local.

  The draws from `np.random.default_rng(seed)` come in keras_mas's order
  (the permutations of tasks 1.., then one training shuffle per task), so
  that both sides see the same arrays in the same order.
  """
  x_tr, y_tr, x_te, y_te = source
  rng = np.random.default_rng(seed)
  parts = []
  if recipe == "split":
    classes = np.unique(y_tr)
    per_task = len(classes) // num_tasks
    for t in range(num_tasks):
      group = classes[t * per_task:(t + 1) * per_task]
      tr, te = np.isin(y_tr, group), np.isin(y_te, group)
      # Labels local to the task: the index of the class in its group.
      parts.append((x_tr[tr], np.searchsorted(group, y_tr[tr]),
                    x_te[te], np.searchsorted(group, y_te[te])))
  elif recipe == "permuted":
    size = x_tr.shape[1]
    for t in range(num_tasks):
      perm = np.arange(size) if t == 0 else rng.permutation(size)
      parts.append((np.take(x_tr, perm, axis=1), y_tr,
                    np.take(x_te, perm, axis=1), y_te))
  else:
    raise ValueError(f"Unknown recipe {recipe!r}: 'split' or 'permuted'.")
  tasks = []
  for x_a, y_a, x_b, y_b in parts:
    order = rng.permutation(len(x_a))
    tasks.append((np.take(x_a, order, axis=0), y_a[order].astype("int64"),
                  x_b, y_b.astype("int64")))
  return tasks


def digest(tasks):
  """A SHA-256 over every task's arrays, to check both sides saw the same."""
  h = hashlib.sha256()
  for arrays in tasks:
    for a in arrays:
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class TimedMAS(MASPlugin):
  """Avalanche's MASPlugin, unchanged, with its importance pass timed."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.importance_s = []

  def _get_importance(self, strategy):
    started = time.perf_counter()
    importance = super()._get_importance(strategy)
    self.importance_s.append(time.perf_counter() - started)
    return importance


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", default="split",
                      choices=["split", "permuted"])
  parser.add_argument("--tasks", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=0.01)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--hidden_units", type=int, default=256)
  parser.add_argument("--strength", type=float, default=1.0)
  parser.add_argument("--alpha", type=float, default=0.5,
                      help="MASPlugin's weight of the old importance.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=FASHION_MNIST_DIR)
  parser.add_argument("--train_samples", type=int, default=None,
                      help="Keep the first N training samples of a task.")
  parser.add_argument("--test_samples", type=int, default=None,
                      help="Keep the first N test samples of a task.")
  parser.add_argument("--digest_only", action="store_true",
                      help="Print the tasks' digest and exit.")
  args = parser.parse_args(argv)

  entered = time.perf_counter()
  tasks = [(x_a[:args.train_samples], y_a[:args.train_samples],
            x_b[:args.test_samples], y_b[:args.test_samples])
           for x_a, y_a, x_b, y_b in make_tasks(
               load_fashion(args.data_dir), args.recipe, args.tasks,
               args.seed)]
  if args.digest_only:
    print(json.dumps({"digest": digest(tasks)}))
    return
  loaded = time.perf_counter()

  torch.manual_seed(args.seed)
  num_outputs = max(int(t[1].max()) + 1 for t in tasks)
  train = [tensor_dataset(torch.from_numpy(x), torch.from_numpy(y),
                          task_labels=0, targets=1)
           for x, y, _, _ in tasks]
  test = [tensor_dataset(torch.from_numpy(x), torch.from_numpy(y),
                         task_labels=0, targets=1)
          for _, _, x, y in tasks]
  benchmark = benchmark_from_datasets(train=train, test=test)
  model = nn.Sequential(
      nn.Linear(784, args.hidden_units), nn.ReLU(),
      nn.Linear(args.hidden_units, args.hidden_units), nn.ReLU(),
      nn.Linear(args.hidden_units, num_outputs))
  optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate,
                              momentum=args.momentum)
  mas = TimedMAS(lambda_reg=args.strength, alpha=args.alpha)
  # Only the per-experience accuracy, no loggers: Avalanche's default
  # evaluator adds loss metrics and a console logger, which would cost the
  # peer time the comparison is not about.
  evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
  strategy = Naive(model=model, optimizer=optimizer,
                   criterion=nn.CrossEntropyLoss(),
                   train_mb_size=args.batch_size, train_epochs=args.epochs,
                   eval_mb_size=args.batch_size, device="cpu",
                   plugins=[mas], evaluator=evaluator)
  built = time.perf_counter()

  n = len(tasks)
  matrix = np.zeros((n, n))
  fit_s, evaluate_s = [], []
  for k, experience in enumerate(benchmark.train_stream):
    started = time.perf_counter()
    # Training, then the plugin's importance pass (after_training_exp).
    strategy.train(experience)
    trained = time.perf_counter()
    metrics = strategy.eval(benchmark.test_stream)
    evaluate_s.append(time.perf_counter() - trained)
    fit_s.append(trained - started - mas.importance_s[-1])
    for j in range(n):
      matrix[k, j] = metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
  finished = time.perf_counter()
  print(json.dumps({
      "side": "avalanche", "recipe": args.recipe, "matrix": matrix.tolist(),
      "imports_s": _IMPORTED - _STARTED, "data_s": loaded - entered,
      "build_s": built - loaded, "fit_s": sum(fit_s),
      "importance_s": sum(mas.importance_s), "evaluate_s": sum(evaluate_s),
      "run_s": finished - entered,
      "versions": {"torch": torch.__version__,
                   "avalanche": sys.modules["avalanche"].__version__},
      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
