r"""keras_mas's MAS against Avalanche's, the whole run, side by side.

  .venv/bin/python benchmarks/peer.py --repeats=3
  .venv/bin/python benchmarks/peer.py --recipes=split \
      --sides=peer:1,tensorflow --repeats=2 --output=/tmp/peer.md
  .venv/bin/python benchmarks/peer.py --report_from=/tmp/peer.json \
      --sides=peer:1,tensorflow

The protocol (issue 30): Fashion-MNIST from Debian's IDX files, 5 tasks,
domain-incremental (one shared head): `split` (5 tasks of 2 classes,
labels 0/1 in each) and `permuted` (5 pixel permutations, the first the
identity, 10 classes); an MLP 784 → 256 → 256 → head; SGD at 0.01 with
momentum 0.9; batch 128; 2 epochs a task; MAS with the same λ
(`--strength`), its importance measured after each task on that task's
training inputs; every task evaluated after each task. ACC is the mean of
the last row of the accuracy matrix, forgetting
`mean_{j<T−1} (max_{l<T−1} R[l][j] − R[T−1][j])`, both computed here from
each side's matrix with the same code.

Each side runs as its own process: keras_mas in this venv (this file, with
`--child`, `KERAS_BACKEND` set), Avalanche 0.6.0 in the peer's venv
(`--peer_python`, running benchmarks/peer_avalanche.py, set up as
benchmarks/PEER.md says). `--sides` names what runs: `peer` or a Keras
backend, each optionally with `:N`, the math libraries' threads (on
shared cores one thread can be several times faster than the default two,
see `_threads_env`). Within a repetition the sides run one after another,
in the order given and reversed on odd repetitions, so that load from
other processes on the shared cores falls on all of them; each
repetition gives ratios of neighbouring runs, and the table reports
medians. Three times per run:

* wall: the process, from spawn to exit (startup and imports included),
  the number the target is about: keras_mas ≤ 0.5 × the peer;
* CPU: the process's user + system time (`os.wait4`), which moves less
  when other processes share the cores;
* in-run: inside the process, from reading the data to the last
  evaluation (imports excluded).

keras_mas runs `run_sequence` (the library's runner, as the app calls it:
`results.json`, TensorBoard logs, a checkpoint and a SavedModel per task),
with `/lean` the same writing a SavedModel of the last task only and no Ω
histograms (`export="last"`, `importance_histograms=False`), or with
`/model` a `keras_mas.MASModel` driven by hand (`fit`, `predict`,
`consolidate`, `reset_optimizer`, nothing written). `run_sequence` takes
an optimizer by name and sets only its learning rate, so the child
registers `MomentumSGD` (Keras's SGD, momentum 0.9) under that name first.

Importance on each side is its own default: keras_mas's exact per-sample
`Ω = mean_k |∂‖F(x_k)‖²/∂θ|` summed over tasks; Avalanche's `MASPlugin`
the mean over minibatches of |∂ mean_batch ‖F(x)‖² / ∂θ| (one backward pass
per batch of 128), decayed across tasks with α = 0.5. The λ is the same
number on both sides; the Ω it multiplies is not the same quantity.
"""

import time

_STARTED = time.perf_counter()

# pylint: disable=g-import-not-at-top
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEER_SCRIPT = os.path.join(_ROOT, "benchmarks", "peer_avalanche.py")
_TARGET = 0.5
# `/lean`: run_sequence writing what a run that only wants its results
# needs: the final SavedModel, no Ω histograms (checkpoints and the other
# TensorBoard logs as usual).
_LEAN = {"export": "last", "importance_histograms": False}

_RECIPES = flags.DEFINE_list("recipes", ["split", "permuted"],
                             "Task recipes: split, permuted.")
_SIDES = flags.DEFINE_list(
    "sides", ["peer:1", "peer", "tensorflow", "jax", "torch:1"],
    "What runs, in order: `peer` (Avalanche) or a Keras backend "
    "(`tensorflow`, `jax`, `torch`), each optionally `:N` (N threads for "
    "the process's math libraries; none: their defaults) and, for "
    "keras_mas, `/model` (a MASModel driven by hand), `/lean` "
    "(`run_sequence` exporting the last task only, without Ω histograms) "
    "or the default `/run_sequence`.")
_REFERENCE = flags.DEFINE_string(
    "reference", None,
    "The peer side the ratios divide by (default: the first peer side).")
_REPORT_FROM = flags.DEFINE_string(
    "report_from", None,
    "Only print the report of the runs saved in this JSON (another run's "
    "`<output>.json`, complete or cut short).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "/work/peer-venv/bin/python",
    "The Python of the peer's venv (Avalanche 0.6.0).")
_STRENGTH = flags.DEFINE_float("strength", 1.0,
                               "λ on both sides (Avalanche's default).")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the tasks and both models.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs per task.")
_TRAIN_SAMPLES = flags.DEFINE_integer(
    "train_samples", None,
    "Keep only the first N (shuffled) training samples of each task, on "
    "both sides; None: all (12,000 a split task, 60,000 a permuted one).")
_TEST_SAMPLES = flags.DEFINE_integer(
    "test_samples", None,
    "Keep only the first N test samples of each task, on both sides.")
_CHECK_DATA = flags.DEFINE_bool(
    "check_data", True,
    "First check that both sides build the same task arrays (digests).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Also write the markdown report here.")
_CHILD = flags.DEFINE_enum("child", None, ["keras_mas", "digest"],
                           "Internal: run one keras_mas side and print JSON.")
_MODE = flags.DEFINE_string("mode", "run_sequence", "Internal: the mode.")
_RECIPE = flags.DEFINE_string("recipe", "split", "Internal: the recipe.")


# ----------------------------------------------------------------------------
# The keras_mas side (a child process, KERAS_BACKEND set by the parent).


def _trimmed(sequence):
  """The sequence with each task cut to `--train_samples`/`--test_samples`
  (the peer cuts its arrays the same way)."""
  for task in sequence.tasks:
    if _TRAIN_SAMPLES.value is not None:
      task.x_train = task.x_train[:_TRAIN_SAMPLES.value]
      task.y_train = task.y_train[:_TRAIN_SAMPLES.value]
    if _TEST_SAMPLES.value is not None:
      task.x_test = task.x_test[:_TEST_SAMPLES.value]
      task.y_test = task.y_test[:_TEST_SAMPLES.value]
  return sequence


def _digest(sequence):
  """SHA-256 over the tasks' arrays as the peer hashes its own: flat
  float32 images and int64 labels."""
  import hashlib
  import numpy as np
  h = hashlib.sha256()
  for t in sequence.tasks:
    for a in (t.x_train.reshape(len(t.x_train), -1), t.y_train,
              t.x_test.reshape(len(t.x_test), -1), t.y_test):
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _keras_mas_child():
  """Runs keras_mas's side once and prints its JSON line."""
  import keras
  import numpy as np
  import keras_mas
  from keras_mas.data import tasks as tasks_lib
  from keras_mas.experiments import architectures
  from keras_mas.experiments import sequential
  imported = time.perf_counter()
  entered = time.perf_counter()
  sequence = _trimmed(tasks_lib.make_sequence(
      "fashion_mnist", _RECIPE.value, "domain", 5, seed=_SEED.value))
  if _CHILD.value == "digest":
    print(json.dumps({"digest": _digest(sequence)}))
    return
  loaded = time.perf_counter()
  n = len(sequence)
  timings = {}
  if _MODE.value in ("run_sequence", "lean"):

    # run_sequence names its optimizer and sets only the learning rate: a
    # registered subclass is how a run gets SGD's momentum through it.
    class MomentumSGD(keras.optimizers.SGD):

      def __init__(self, learning_rate=0.01, momentum=0.9, **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum,
                         **kwargs)

    keras.saving.get_custom_objects()["MomentumSGD"] = MomentumSGD
    with tempfile.TemporaryDirectory(prefix="keras_mas_peer_") as workdir:
      results = sequential.run_sequence(
          sequence, workdir, method="mas", strength=_STRENGTH.value,
          epochs=_EPOCHS.value, batch_size=128, learning_rate=0.01,
          optimizer="MomentumSGD", hidden_units=256, seed=_SEED.value,
          verbose=0, **_LEAN if _MODE.value == "lean" else {})
      finished = time.perf_counter()
    matrix = results["accuracy_matrix"]
    timings["setup_s"] = results["setup_s"]
    for key in ("fit_s", "evaluate_s", "consolidate_s", "save_s"):
      timings[key] = sum(t[key] for t in results["timings"])
    timings["first_fit_s"] = results["timings"][0]["fit_s"]
  elif _MODE.value == "model":
    net = architectures.build("mlp", sequence.input_shape,
                              sequence.num_outputs, hidden_units=256,
                              seed=_SEED.value)
    net.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # As run_sequence does: several steps per traced call, except on
        # PyTorch, whose Keras trainer runs one eager step per call.
        steps_per_execution=1 if keras.backend.backend() == "torch" else 8)
    matrix = np.zeros((n, n))
    timings = {"fit_s": 0.0, "evaluate_s": 0.0, "consolidate_s": 0.0}
    for k, task in enumerate(sequence.tasks):
      keras.utils.set_random_seed(_SEED.value * 1009 + k)
      started = time.perf_counter()
      net.fit(task.x_train, task.y_train, batch_size=128,
              epochs=_EPOCHS.value, shuffle=True, verbose=0)
      trained = time.perf_counter()
      for j, other in enumerate(sequence.tasks):
        logits = net.predict(other.x_test, batch_size=128, verbose=0)
        matrix[k, j] = np.mean(np.argmax(logits, -1) == other.y_test)
      evaluated = time.perf_counter()
      net.consolidate(task.x_train, strength=_STRENGTH.value)
      net.reset_optimizer()
      consolidated = time.perf_counter()
      timings["fit_s"] += trained - started
      timings["evaluate_s"] += evaluated - trained
      timings["consolidate_s"] += consolidated - evaluated
      if k == 0:
        timings["first_fit_s"] = trained - started
    matrix = matrix.tolist()
    finished = time.perf_counter()
  else:
    raise ValueError(f"Unknown --mode {_MODE.value!r}")
  print(json.dumps({
      "side": "keras_mas", "backend": keras.backend.backend(),
      "mode": _MODE.value, "recipe": _RECIPE.value, "matrix": matrix,
      "imports_s": imported - _STARTED, "data_s": loaded - entered,
      "run_s": finished - entered, **timings,
      "versions": {"keras": keras.__version__,
                   "keras_mas": getattr(keras_mas, "__version__", "?")}}))


# ----------------------------------------------------------------------------
# The parent: runs both sides, interleaved, and reports.


def _common_args(recipe):
  args = [f"--recipe={recipe}", f"--strength={_STRENGTH.value}",
          f"--seed={_SEED.value}", f"--epochs={_EPOCHS.value}"]
  for flag in (_TRAIN_SAMPLES, _TEST_SAMPLES):
    if flag.value is not None:
      args.append(f"--{flag.name}={flag.value}")
  return args


def _parse(side):
  """`(backend or "peer", threads or None, mode)` of a `--sides` entry."""
  side, _, mode = side.partition("/")
  name, _, threads = side.partition(":")
  return name, int(threads) if threads else None, mode or "run_sequence"


def _threads_env(env, threads):
  """Caps every math library's thread pool at `threads`.

  On shared cores, a pool as wide as the machine waits at each operation's
  barrier for a thread that another process holds (PyTorch's OpenMP:
  2 threads ran this MLP's step 7-10x slower than 1 beside 3 busy
  processes), so a run may be faster with fewer.
  """
  if threads is None:
    return
  for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    env[key] = str(threads)
  if threads == 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false").strip()


def _command(side, recipe, digest=False):
  """`(argv, env)` of one side's process (a `--sides` entry)."""
  env = dict(os.environ)
  backend, threads, mode = _parse(side)
  _threads_env(env, threads)
  if backend == "peer":
    argv = [_PEER_PYTHON.value, "-W", "ignore", _PEER_SCRIPT]
    argv += _common_args(recipe) + (["--digest_only"] if digest else [])
    return argv, env
  env["KERAS_BACKEND"] = backend
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # Keeps TensorFlow's banner off stderr.
  argv = [sys.executable, os.path.abspath(__file__),
          f"--child={'digest' if digest else 'keras_mas'}", f"--mode={mode}"]
  return argv + _common_args(recipe), env


def _spawn(side, recipe, digest=False):
  """Runs one process; its JSON line, with `wall_s` and `cpu_s` added."""
  argv, env = _command(side, recipe, digest)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=out, stderr=err, env=env,
                               cwd=_ROOT)
    # wait4 gives this child's own rusage: CPU of all its threads.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    out.seek(0)
    err.seek(0)
    lines = [l for l in out.read().decode().splitlines() if l.startswith("{")]
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
      raise RuntimeError(f"{' '.join(argv)} failed:\n"
                         f"{err.read().decode()[-3000:]}")
  result = json.loads(lines[-1])
  result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime)
  return result


def _acc_forgetting(matrix):
  """ACC and forgetting of an accuracy matrix (keras_mas's definitions,
  `keras_mas.experiments.metrics`, restated so both sides share them)."""
  t = len(matrix)
  acc = sum(matrix[-1]) / t
  forgetting = sum(max(matrix[l][j] for l in range(t - 1)) - matrix[-1][j]
                   for j in range(t - 1)) / (t - 1)
  return acc, forgetting


def _is_peer(side):
  return _parse(side)[0] == "peer"


def _label(side):
  backend, threads, mode = _parse(side)
  threads = "default threads" if threads is None else f"{threads} thread" + (
      "s" if threads > 1 else "")
  if backend == "peer":
    return f"Avalanche 0.6.0 MAS, {threads}"
  return f"keras_mas {backend} {mode}, {threads}"


def _report(runs, sides, reference):
  """The markdown report of `runs[recipe][side]` = list of results, ratios
  over the `reference` side's runs of the same repetition."""
  lines = []
  for recipe, by_side in runs.items():
    peer = by_side[reference]
    sides = [s for s in sides if by_side.get(s)]
    lines += [
        f"### {recipe} ({len(peer)} repetitions, medians; ratios over "
        f"{_label(reference)}, run by run)", "",
        "| side | wall (s) | CPU (s) | in-run (s) | wall ÷ peer | "
        "CPU ÷ peer | in-run ÷ peer | ACC | forgetting | target ≤ 0.5× "
        "peer wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "--- |"]
    for side in sides:
      results = by_side[side]
      med = {k: statistics.median(r[k] for r in results)
             for k in ("wall_s", "cpu_s", "run_s")}
      # Ratios of the runs of one repetition, which ran next to each other.
      ratio = {k: statistics.median(r[k] / p[k]
                                    for r, p in zip(results, peer))
               for k in ("wall_s", "cpu_s", "run_s")}
      accs = [_acc_forgetting(r["matrix"]) for r in results]
      acc = statistics.median(a for a, _ in accs)
      forgetting = statistics.median(f for _, f in accs)
      verdict = ("" if _is_peer(side) else
                 "met" if ratio["wall_s"] <= _TARGET else "missed")
      lines.append(
          f"| {_label(side)} | {med['wall_s']:.1f} | {med['cpu_s']:.1f} | "
          f"{med['run_s']:.1f} | {ratio['wall_s']:.3f} | "
          f"{ratio['cpu_s']:.3f} | {ratio['run_s']:.3f} | {acc:.3f} | "
          f"{forgetting:.3f} | {verdict} |")
    lines += ["", "Where the time goes (medians, seconds; keras_mas's "
              "importance is `consolidate` with the TensorBoard histograms "
              "of Ω, its save the checkpoint and SavedModel of each task; "
              "the peer's fit includes its per-sample data loading):", "",
              "| side | imports | data | fit | importance | evaluation | "
              "save | first task's fit |", "| --- | ---: | ---: | ---: | "
              "---: | ---: | ---: | ---: |"]
    for side in sides:
      results = by_side[side]

      def med(key, results=results):
        values = [r[key] for r in results if key in r]
        return f"{statistics.median(values):.2f}" if values else "–"

      importance = "importance_s" if _is_peer(side) else "consolidate_s"
      lines.append(
          f"| {_label(side)} | {med('imports_s')} | {med('data_s')} | "
          f"{med('fit_s')} | {med(importance)} | {med('evaluate_s')} | "
          f"{med('save_s')} | {med('first_fit_s')} |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CHILD.value is not None:
    _keras_mas_child()
    return
  sides = list(_SIDES.value)
  reference = _REFERENCE.value or next(s for s in sides if _is_peer(s))
  if _REPORT_FROM.value:
    with open(_REPORT_FROM.value) as f:
      runs = json.load(f)
    for by_side in runs.values():
      # Only complete repetitions: every side's first n runs.
      n = min(len(by_side.get(s, [])) for s in sides)
      for s in sides:
        by_side[s] = by_side.get(s, [])[:n]
    print(_report(runs, sides, reference))
    return
  header = [
      "## keras_mas MAS vs Avalanche MAS, Fashion-MNIST, 5 tasks", "",
      f"Command: `{' '.join(sys.argv)}`", "",
      f"λ = {_STRENGTH.value}, seed {_SEED.value}, {_EPOCHS.value} epochs "
      f"a task, batch 128, SGD 0.01 momentum 0.9, MLP 784-256-256, "
      f"domain-incremental; training samples a task: "
      f"{_TRAIN_SAMPLES.value or 'all'}, test samples a task: "
      f"{_TEST_SAMPLES.value or 'all'}.", ""]
  if _CHECK_DATA.value:
    for recipe in _RECIPES.value:
      ours = _spawn("tensorflow", recipe, digest=True)["digest"]
      theirs = _spawn("peer", recipe, digest=True)["digest"]
      same = "the same" if ours == theirs else "DIFFERENT"
      header.append(f"- {recipe}: both sides' task arrays are {same} "
                    f"(SHA-256 {ours[:16]}…, {theirs[:16]}…)")
      print(header[-1], flush=True)
    header.append("")
  runs = {r: {s: [] for s in sides} for r in _RECIPES.value}
  for repeat in range(_REPEATS.value):
    for recipe in _RECIPES.value:
      # Alternate which side starts, so neither always follows the other.
      order = sides if repeat % 2 == 0 else sides[::-1]
      for side in order:
        result = _spawn(side, recipe)
        runs[recipe][side].append(result)
        acc, forgetting = _acc_forgetting(result["matrix"])
        print(f"[{repeat}] {recipe} {_label(side)}: wall "
              f"{result['wall_s']:.1f}s cpu {result['cpu_s']:.1f}s in-run "
              f"{result['run_s']:.1f}s ACC {acc:.3f} forgetting "
              f"{forgetting:.3f}", flush=True)
        if _OUTPUT.value:
          # Every run so far, so that a run cut short still leaves its data.
          _write_json(runs)
  report = "\n".join(header) + "\n" + _report(runs, sides, reference)
  print(report)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(report + "\n")
    _write_json(runs)


def _write_json(runs):
  """Every run's results, beside `--output`, as `<output>.json`."""
  with open(os.path.splitext(_OUTPUT.value)[0] + ".json", "w") as f:
    json.dump(runs, f)


if __name__ == "__main__":
  app.run(main)
