"""run_corpora: a causal language model learns text corpora one by one.

The language-model counterpart of `sequential.run_sequence`. Each task is a
corpus (`keras_mas.data.corpora`: plain text for continued pretraining, or
prompt and response pairs for supervised fine-tuning); the model is the
user's KerasHub `CausalLM`, whose own preprocessor makes the next-token
targets. After each task every corpus's held-out next-token loss is
measured (nats per token; its exponential is the perplexity): the loss
matrix `L[i][j]` plays the accuracy matrix's part, and forgetting is a rise
of loss. The run's settings are one `LanguageRun`, recorded in
`results.json` and compared on resume.

Example:

```python
lm = keras_mas.data.sources.load_model("/presets/gemma3_1b")
run = keras_mas.experiments.language.LanguageRun(
    corpora=("/data/news", "/data/recipes"), lora_rank=8, epochs=2)
results = keras_mas.experiments.language.run_corpora(run, lm, "/tmp/lm")
print(results["loss_matrix"], results["forgetting"])
```
"""

import contextlib
import os
import random
import shutil
import time
import weakref

import keras
from keras.src.backend.common import global_state
import numpy as np
import tensorflow as tf

from keras_mas.core import model_parallel
from keras_mas.core import models
from keras_mas.core import multi_process
from keras_mas.data import corpora as corpora_lib
from keras_mas.experiments import checkpoints
from keras_mas.experiments import configs
from keras_mas.experiments import options
from keras_mas.experiments import preemption
from keras_mas.experiments import progress as progress_lib
from keras_mas.experiments import resumable

__all__ = ["METHODS", "LanguageRun", "format_losses", "next_token_loss",
           "run_corpora"]

METHODS = configs.LANGUAGE_METHODS
LanguageRun = configs.LanguageRun
_STATE_KEYS = ("config", "loss_matrix", "baseline", "timings")
_PROMPT_WORDS = 4
# Per model, its traced next-token loss sums (`next_token_loss`).
_LOSS_SUMS = weakref.WeakKeyDictionary()


def run_corpora(run, model, workdir, importance_corpus=None, resume=False,
                stop=None, extra=None, verbose=1):
  """Trains the causal LM `model` on `run.corpora` one after another.

  Writes into `workdir`: `results.json` (the loss and perplexity matrices,
  forgetting, gains, the importance corpus's loss, timings, `run`'s
  settings), TensorBoard logs (`tensorboard/`: per-corpus loss and
  perplexity, a generated sample per corpus as text, training curves), a
  checkpoint per corpus (`checkpoints/`, for `resume`) and the adapted
  model after each corpus as a KerasHub preset (`export/task_<k>/`, which
  `keras_hub.models.CausalLM.from_preset` loads; LoRA factors are merged
  into the kernels there, as KerasHub saves them).

  Args:
    run: a `LanguageRun`.
    model: a KerasHub `CausalLM` with its preprocessor; copied, never
      trained in place.
    workdir: output directory.
    importance_corpus: folder of the corpus `model` was trained or deployed
      on: with a method that measures importance, Ω is measured on it
      before the first corpus, and its held-out loss is reported before
      and after each corpus (with any method).
    resume: continue the run in `workdir`.
    stop: a `preemption.StopRequest`: once set, training ends after the
      step under way, a checkpoint is written, and `preemption.Preempted`
      is raised.
    extra: a JSON-serialisable dict recorded in `results.json`.
    verbose: 0 silent, 1 a line per corpus and the table.

  Returns:
    The results dict written to `results.json`.

  Raises:
    ValueError: before any training, naming the argument, for a model that
      is not a causal LM with a preprocessor, a corpus that does not read
      (see `corpora.load_corpus`), a `sequence_length` beyond the model's,
      or a `workdir` holding another run.
  """
  entered = time.perf_counter()
  lm = _check_causal_lm(model, run)
  # About one sequence's tokens a passage: a word is one token or more.
  words = max(1, (run.sequence_length or lm.preprocessor.sequence_length)
              * 3 // 4)
  corpora = [corpora_lib.load_corpus(c, seed=run.seed, passage_words=words)
             for c in run.corpora]
  old = (None if importance_corpus is None else corpora_lib.load_corpus(
      importance_corpus, seed=run.seed, passage_words=words,
      argument="importance_data"))
  _check_responses_fit(lm.preprocessor, corpora, run)
  model_parallel.check_batch_size(run.batch_size)
  checkpoints.check_writable(workdir)
  config = {**run.recorded(), "model": f"{type(lm).__name__}:{lm.name}",
            "importance_corpus": None if old is None else old.name}
  write_dir = checkpoints.write_dir(workdir)
  with checkpoints.workdir_lock(write_dir):
    net, progress, first = _start(run, lm, config, corpora, old, workdir,
                                  resume, verbose, write_dir)
    writer = tf.summary.create_file_writer(os.path.join(write_dir,
                                                        "tensorboard"))
    setup_s = time.perf_counter() - entered
    for k in range(progress.first_task, len(corpora)):
      _learn(net, run, corpora, k, old, progress, write_dir, writer, stop,
             first if k == progress.first_task else (0, 0), config, verbose)
    writer.close()
    results = {"method": run.method, "corpora": [c.name for c in corpora],
               **progress.summary(), "config": config, "setup_s": setup_s,
               "extra": extra or {}}
    checkpoints.write_json(os.path.join(write_dir, "results.json"), results)
  if write_dir != workdir:
    shutil.rmtree(write_dir, ignore_errors=True)
  if verbose:
    print(format_losses(results))
  return results


def _learn(net, run, corpora, k, old, progress, write_dir, writer, stop,
           first, config, verbose):
  """Corpus `k`: fit, measure, consolidate, checkpoint, export, log (into
  `write_dir`)."""
  if stop is not None and stop.is_set():
    raise preemption.Preempted(stop.reason, k, resumable.resumes_from(k, None))
  started = time.perf_counter()
  _seed(run.seed * 1009 + k)
  preprocessor = net.preprocessor
  in_task = resumable.InTaskCheckpoint(
      write_dir, k, run.epochs, first, run.checkpoint_seconds,
      run.checkpoint_steps, stop,
      lambda: {"config": config, **progress.state()})
  if first == (0, 0):
    net.compile(optimizer=options.check_optimizer(run.optimizer,
                                                  run.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                weighted_metrics=[])
  resumable.fit_task(
      net, corpora_lib.token_batches(
          preprocessor, corpora[k].train, run.batch_size,
          seed=run.seed * 1009 + k,
          multiple_of=model_parallel.data_parallel_size()),
      k, run.epochs, first, verbose, write_dir, writer, [in_task])
  if stop is not None and stop.is_set():
    raise preemption.Preempted(stop.reason, k,
                               resumable.resumes_from(k, in_task.last))
  trained = time.perf_counter()
  progress.matrix[k] = [next_token_loss(net, c.test, run.batch_size)
                        for c in corpora]
  evaluated = time.perf_counter()
  if METHODS[run.method] is not None:
    _consolidate(net, run, corpora[k])
  consolidated = time.perf_counter()
  progress.record(k, None if old is None else
                  next_token_loss(net, old.test, run.batch_size),
                  fit_s=trained - started,
                  evaluate_s=evaluated - trained,
                  consolidate_s=consolidated - evaluated)
  samples = _samples(net, corpora, run.generate_length)
  _log(writer, progress, corpora, samples, k)
  checkpoints.write(write_dir, k, net, {"config": config, **progress.state()})
  checkpoints.remove_in_task(write_dir)
  _export_preset(net.model, os.path.join(write_dir, "export", f"task_{k}"))
  progress.timings[-1]["save_s"] = time.perf_counter() - consolidated
  if verbose:
    losses = " ".join(f"{v:.3f}" for v in progress.matrix[k])
    print(f"task {k} ({corpora[k].name}): next-token loss on corpora 0.."
          f"{len(corpora) - 1}: {losses}  fit {trained - started:.1f}s  "
          f"consolidate {consolidated - evaluated:.1f}s")


def _start(run, lm, config, corpora, old, workdir, resume, verbose,
           write_dir):
  """`(net, progress, first)`: a new run's, or the one in `workdir`'s
  (read by every process; `write_dir` is this process's to clean)."""
  done = checkpoints.latest(workdir)
  in_task = checkpoints.latest_in_task(workdir)
  if in_task is not None and in_task[0] != (done[0] + 1 if done else 0):
    in_task = None  # Left from before the last corpus's own checkpoint.
  if (done or in_task) is not None:
    if not resume:
      raise ValueError(
          "Invalid value for argument `workdir`. Expected a directory without "
          "checkpoints, or resume=True to continue the run in it. Received: "
          f"workdir={workdir!r} holding {(in_task or done)[-1]}")
    k, path = (in_task[0] - 1, in_task[3]) if in_task else done
    state = checkpoints.read_state(path, keys=_STATE_KEYS)
    checkpoints.check_config(state.get("config"), config, workdir)
    net = checkpoints.load_model(path)
    checkpoints.remove_partial_writes(write_dir)
    progress = _Progress.from_state(k, state)
    first = in_task[1:3] if in_task else (0, 0)
    if progress.first_task < len(corpora):
      progress.resumes.append({"task": progress.first_task,
                               "epoch": first[0], "batch": first[1]})
    if verbose:
      print(f"Resuming the run in {workdir} at corpus "
            f"{progress.first_task}, epoch {first[0]}, batch {first[1]}")
    return net, progress, first
  _seed(run.seed)
  copy = checkpoints.copy_model(lm, wrap=False)
  if run.sequence_length:
    copy.preprocessor.sequence_length = run.sequence_length
  if run.lora_rank:
    copy.backbone.enable_lora(run.lora_rank)
  net = models.MASModel.from_model(copy)
  net.strength = run.strength
  progress = _Progress.start(net, corpora, old, run.batch_size)
  if old is not None and METHODS[run.method] is not None:
    _consolidate(net, run, old)
  return net, progress, (0, 0)


def _seed(seed):
  """`keras.utils.set_random_seed` but TensorFlow's global seed, which
  clears TensorFlow's eager kernel cache and with it the resources the
  kernels own: a SentencePiece tokenizer (Gemma's) made before would fail
  ("Resource ... SentencepieceOp ... does not exist"). The shuffles here
  have seeds of their own."""
  random.seed(seed)
  np.random.seed(seed)
  global_state.set_global_attribute("global_random_seed", seed)
  global_state.set_global_attribute("global_seed_generator", None)
  if keras.backend.backend() == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)


def _consolidate(net, run, corpus):
  """Ω on `corpus`'s training texts (prompt and response whole), θ* ← θ."""
  texts = corpus.texts[:run.importance_samples]
  net.consolidate(corpora_lib.token_batches(net.preprocessor, texts,
                                            run.batch_size),
                  method=METHODS[run.method], strength=run.strength,
                  normalize=run.normalize_importance)


def next_token_loss(net, part, batch_size):
  """Mean next-token negative log-likelihood (nats per weighted token) of
  the causal LM `net` on a corpus part; its exponential is the perplexity.

  Tokens weigh as the preprocessor weighs them (padding 0; with prompt and
  response pairs, the response's only). Each batch's sums are computed in
  one traced call kept with the model, so the vocabulary-sized logits never
  leave it.
  """
  sums = _loss_sums(net)
  total = count = 0.0
  for x, y, weight in corpora_lib.token_batches(net.preprocessor, part,
                                                batch_size):
    batch_total, batch_count = sums(
        *tf.nest.map_structure(lambda t: t.numpy(), (x, y, weight)))
    total += float(keras.ops.convert_to_numpy(batch_total))
    count += float(keras.ops.convert_to_numpy(batch_count))
  return total / count if count else float("nan")


def _loss_sums(net):
  """`(x, y, weight) -> (Σ weight·nll, Σ weight)` for `net`, traced once."""
  sums = _LOSS_SUMS.get(net)
  if sums is not None:
    return sums

  def weighted(logits, y, weight):
    nll = keras.ops.sparse_categorical_crossentropy(
        y, keras.ops.cast(logits, "float32"), from_logits=True)
    weight = keras.ops.cast(weight, "float32")
    return keras.ops.sum(nll * weight), keras.ops.sum(weight)

  model = weakref.ref(net)  # The cache must not keep the model alive.
  backend = keras.backend.backend()
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    # The variables' values are passed in: read inside the trace, they
    # would be compiled in as constants.
    stateless = jax.jit(lambda trainable, other, x, y, weight: weighted(
        model().stateless_call(trainable, other, x, training=False)[0], y,
        weight))
    sums = lambda *batch: stateless(
        [v.value for v in model().trainable_variables],
        [v.value for v in model().non_trainable_variables], *batch)
  elif backend == "tensorflow":
    sums = tf.function(lambda x, y, weight: weighted(
        model()(x, training=False), y, weight), reduce_retracing=True)
  else:
    import torch  # pylint: disable=g-import-not-at-top

    def sums(x, y, weight):
      with torch.no_grad():
        return weighted(model()(x, training=False), y, weight)
  _LOSS_SUMS[net] = sums
  return sums


class _Progress(progress_lib.Progress):
  """A language-model run's progress: next-token losses."""
  MATRIX = "loss_matrix"
  DEPLOYED = "importance_data_loss"

  @classmethod
  def start(cls, net, corpora, old, batch_size):
    return cls.new([next_token_loss(net, c.test, batch_size) for c in corpora],
                   None if old is None else
                   [next_token_loss(net, old.test, batch_size)])

  def summary(self):
    """The results' measures of the corpora learned so far."""
    done = int(np.sum(~np.isnan(self.matrix[:, 0])))
    matrix = self.matrix[:done]
    return {**self.state(),
            "perplexity_matrix": np.exp(matrix).tolist(),
            "final_loss": float(np.mean(matrix[-1])) if done else None,
            "forgetting": loss_forgetting(matrix),
            "gain": [float((self.matrix[k - 1, k] if k else self.baseline[k])
                           - self.matrix[k, k]) for k in range(done)]}


def loss_forgetting(matrix):
  """Mean over the corpora before the last of the rise of their loss from
  the lowest it was once learned: `L[T−1][j] − min_{j≤i<T−1} L[i][j]`."""
  matrix = np.asarray(matrix, dtype="float64")
  t = len(matrix)
  if t < 2:
    return 0.0
  return float(np.mean([matrix[-1, j] - matrix[j:t - 1, j].min()
                        for j in range(t - 1)]))


def format_losses(results):
  """The loss matrix (with perplexities) and forgetting as a table."""
  matrix = np.asarray(results["loss_matrix"], dtype="float64")
  names = results["corpora"]
  width = max(16, *(len(n) + 2 for n in names))
  lines = [f"{results['method']}: next-token loss (perplexity) on each "
           "corpus's held-out text, after training each corpus",
           "after \\ on".ljust(14) + "".join(n.rjust(width) for n in names),
           "start".ljust(14) + "".join(_cell(v, width)
                                       for v in results["baseline"])]
  for name, row in zip(names, matrix):
    if not np.isnan(row[0]):
      lines.append(name[:13].ljust(14) + "".join(_cell(v, width) for v in row))
  lines.append(f"forgetting (loss rise) {results['forgetting']:.3f}  "
               "gain on each corpus "
               + " ".join(f"{g:.3f}" for g in results["gain"]))
  old = results.get("importance_data_loss")
  if old:
    lines.append("loss on the importance corpus: before "
                 f"{old[0]:.3f}" + "".join(
                     f", after {n} {v:.3f}" for n, v in zip(names, old[1:])))
  return "\n".join(lines)


def _cell(loss, width):
  return f"{loss:.3f} ({np.exp(loss):.1f})".rjust(width)


def _samples(net, corpora, length):
  """Per corpus, the model's continuation of its first held-out text's
  first words (what TensorBoard shows)."""
  if not length:
    return {}
  samples = {}
  # Under a mesh, one prompt a data-parallel device: a batch of one would not
  # split among them.
  copies = model_parallel.data_parallel_size()
  for corpus in corpora:
    first = (corpus.test["prompts"][0] if corpus.kind == "supervised"
             else " ".join(corpus.test[0].split()[:_PROMPT_WORDS]))
    with _gathered_before_postprocess(net.preprocessor):
      generated = net.model.generate(
          [first] * copies if copies > 1 else first,
          max_length=min(length, net.preprocessor.sequence_length))
    samples[corpus.name] = str(generated[0] if copies > 1 else generated)
  return samples


@contextlib.contextmanager
def _gathered_before_postprocess(preprocessor):
  """Across processes, `generate`'s tokens gathered whole before the
  preprocessor reads them: sharded over every process's devices, no
  process can fetch them alone (every process generates, and gathers)."""
  if multi_process.count() == 1:
    yield
    return
  postprocess = preprocessor.generate_postprocess
  preprocessor.generate_postprocess = lambda x: postprocess(
      keras.tree.map_structure(multi_process.whole_value, x))
  try:
    yield
  finally:
    del preprocessor.generate_postprocess


def _log(writer, progress, corpora, samples, k):
  with writer.as_default():
    for corpus, loss in zip(corpora, progress.matrix[k]):
      tf.summary.scalar(f"next_token_loss/{corpus.name}", loss, step=k)
      tf.summary.scalar(f"perplexity/{corpus.name}", np.exp(loss), step=k)
    for name, text in samples.items():
      tf.summary.text(f"generate/{name}", text, step=k)
    tf.summary.scalar("sequence/forgetting",
                      loss_forgetting(progress.matrix[:k + 1]), step=k)
  writer.flush()


def _export_preset(lm, target):
  """`lm` as a KerasHub preset at `target`, whole or not at all. Across
  processes every process gathers the weights that span processes."""
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  staging = f"{target}.partial-{os.getpid()}"
  with multi_process.whole_values(lm):
    lm.save_to_preset(staging)
  checkpoints.replace_directory(staging, target)


def _check_responses_fit(preprocessor, corpora, run):
  """Raises, naming `sequence_length`, for a prompt and response corpus
  whose responses all fall past the sequence (nothing would train)."""
  kept = preprocessor.sequence_length
  preprocessor.sequence_length = run.sequence_length or kept
  try:
    empty = [(corpus.name, name) for corpus in corpora
             if corpus.kind == "supervised"
             for name, part in (("train", corpus.train),
                                ("test", corpus.test))
             if not sum(float(np.sum(w)) for _, _, w in
                        corpora_lib.token_batches(preprocessor, part,
                                                  run.batch_size))]
  finally:
    preprocessor.sequence_length = kept  # The user's model is not changed.
  for corpus_name, name in empty[:1]:
        raise ValueError(
            "Invalid value for argument `sequence_length`. Expected room for "
            f"response tokens after the prompts. Received: "
            f"sequence_length={run.sequence_length or kept}, which the "
            f"prompts of {corpus_name!r} ({name}) fill")


def _check_causal_lm(model, run):
  """`model`, a KerasHub CausalLM fit for `run`, or ValueError."""
  import keras_hub  # pylint: disable=g-import-not-at-top
  if (not isinstance(model, keras_hub.models.CausalLM)
      or getattr(model, "preprocessor", None) is None):
    raise ValueError(
        "Invalid value for argument `model`. Expected a KerasHub CausalLM "
        "with its preprocessor (a causal LM preset) for text corpora. "
        f"Received: {type(model).__name__} {getattr(model, 'name', '')!r}"
        + ("" if isinstance(model, keras_hub.models.CausalLM) else
           " (a classifier takes class folders)"))
  most = getattr(model.backbone, "max_sequence_length", None)
  if run.sequence_length and most and run.sequence_length > most:
    raise ValueError(
        "Invalid value for argument `sequence_length`. Expected at most "
        f"{most}, the model's longest sequence. Received: "
        f"sequence_length={run.sequence_length}")
  if run.lora_rank and not hasattr(model.backbone, "enable_lora"):
    raise ValueError(
        "Invalid value for argument `lora_rank`. Expected a backbone with "
        f"enable_lora. Received: {type(model.backbone).__name__}")
  return model
