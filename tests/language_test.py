"""Language-model tasks: corpora, the next-token loss, the runner and the app.

Corpora are cut from text Debian ships; models are tiny KerasHub causal
LMs saved as local presets (tests/language_models.py). The five
architectures through the whole app run are marked slow.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import app_runner
import language_models
import tolerances
from keras_mas.data import corpora
from keras_mas.experiments import language

keras_hub = pytest.importorskip("keras_hub")

_PAIRS = [{"prompt": f"Q{i}: add one to {i}.", "response": f" {i + 1}"}
          for i in range(10)]


def _jsonl(folder, records, name="pairs.jsonl"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Two real text domains, a prompt/response corpus and a Gemma preset."""
  root = tmp_path_factory.mktemp("language")
  return {
      "licenses": language_models.write_corpus(
          root / "licenses", language_models.license_text(chars=2500)),
      "changelogs": language_models.write_corpus(
          root / "changelogs", language_models.changelog_text(chars=2500)),
      "apache": language_models.write_corpus(
          root / "apache", language_models.license_text("Apache-2.0", 1500)),
      "pairs": _jsonl(root / "pairs", _PAIRS),
      "preset": language_models.save_preset("gemma", root / "gemma"),
      # Learned positions: a longest sequence (64).
      "gpt2": language_models.save_preset("gpt2", root / "gpt2"),
      "root": root,
  }


# --- Corpora. ---------------------------------------------------------------

def test_text_is_cut_into_passages_of_whole_words(tmp_path):
  words = [f"w{i}" for i in range(25)]
  text = " ".join(words[:5]) + "\n\n" + " ".join(words[5:25])
  corpus = corpora.load_corpus(
      language_models.write_corpus(tmp_path / "c", text), passage_words=8)
  passages = sorted(np.concatenate([corpus.train, corpus.test]).tolist(),
                    key=lambda p: int(p.split()[0][1:]))
  assert passages == ["w0 w1 w2 w3 w4", " ".join(words[5:13]),
                      " ".join(words[13:21]), " ".join(words[21:25])]
  assert len(corpus.test) == 1 and corpus.kind == "text"


def test_prompt_response_pairs_and_a_given_split(tmp_path):
  _jsonl(tmp_path / "c" / "train", _PAIRS[:8])
  _jsonl(tmp_path / "c" / "test", _PAIRS[8:])
  corpus = corpora.load_corpus(str(tmp_path / "c"))
  assert corpus.kind == "supervised" and len(corpus) == 8
  assert list(corpus.test["prompts"]) == ["Q8: add one to 8.",
                                          "Q9: add one to 9."]
  assert corpus.texts[0] == "Q0: add one to 0. 1"


@pytest.mark.parametrize("make, message", [
    (lambda d: os.makedirs(d), "no .txt or .jsonl file"),
    (lambda d: language_models.write_corpus(d, "x\0y", "a.txt"),
     "'a.txt', not text"),
    (lambda d: _jsonl(d, [{"prompt": "p"}]), "pairs.jsonl:1"),
    (lambda d: language_models.write_corpus(d, "{oops", "a.jsonl"),
     "a.jsonl:1, not JSON"),
    (lambda d: language_models.write_corpus(
        os.path.join(d, "positive"), "good"), "class subfolders"),
    (lambda d: (language_models.write_corpus(d, "a b"),
                _jsonl(d, _PAIRS)), "both"),
    (lambda d: language_models.write_corpus(d, "one"), "1 passage"),
])
def test_bad_corpora_are_refused_naming_the_file(tmp_path, make, message):
  folder = str(tmp_path / "c")
  make(folder)
  with pytest.raises(ValueError, match="argument `task_dirs`") as e:
    corpora.load_corpus(folder)
  assert message in str(e.value)


def test_responses_alone_weigh_for_a_plain_preprocessor(data):
  lm = keras_hub.models.CausalLM.from_preset(data["preset"])
  pairs = {"prompts": np.array(["to be", "or"], dtype=object),
           "responses": np.array([" not", " to be"], dtype=object)}
  (x, y, weight), = corpora.token_batches(lm.preprocessor, pairs, 2)
  tokenizer = lm.preprocessor.tokenizer
  for i in range(2):
    prompt = np.asarray(tokenizer(pairs["prompts"][i])).tolist()
    response = np.asarray(tokenizer(pairs["responses"][i])).tolist()
    ids = x["token_ids"].numpy()[i]
    # <bos> prompt response <eos>, the response's next tokens weighed.
    assert ids[:1 + len(prompt) + len(response)].tolist() == (
        [tokenizer.start_token_id] + prompt + response)
    weighted = y.numpy()[i][weight.numpy()[i]].tolist()
    assert weighted == response + [tokenizer.end_token_id]


def test_next_token_loss_is_the_weighted_mean_of_the_tokens_nll(data):
  lm = keras_hub.models.CausalLM.from_preset(data["preset"])
  net = keras_mas_model(lm)
  part = corpora.load_corpus(data["licenses"]).train[:5]
  nll, weights = [], []
  for x, y, w in corpora.token_batches(lm.preprocessor, part, 2):
    logits = keras.ops.convert_to_numpy(lm(x)).astype("float64")
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll.append(-np.take_along_axis(log_p, y.numpy()[..., None], -1)[..., 0]
               [w.numpy()])
    weights.append(w.numpy().sum())
  expected = np.concatenate(nll).sum() / np.sum(weights)
  tolerances.assert_close(language.next_token_loss(net, part, 3), expected)


def test_token_batches_cut_the_last_batch_to_a_multiple(data):
  # 7 texts in batches of 4 on 2 data-parallel devices: 4 + 2, one left
  # out, another one each epoch.
  lm = keras_hub.models.CausalLM.from_preset(data["preset"])
  part = np.array([f"text number {i} of seven" for i in range(7)])
  batches = corpora.token_batches(lm.preprocessor, part, 4, seed=0,
                                  multiple_of=2)
  epochs = [[x["token_ids"].numpy() for x, _, _ in batches]
            for _ in range(4)]
  assert all([len(ids) for ids in epoch] == [4, 2] for epoch in epochs)
  kept = [{tuple(row) for ids in epoch for row in ids} for epoch in epochs]
  assert len({frozenset(k) for k in kept}) > 1


def keras_mas_model(lm):
  import keras_mas  # pylint: disable=g-import-not-at-top
  return keras_mas.MASModel.from_model(lm)


def test_loss_forgetting_is_the_rise_from_the_lowest_loss():
  matrix = [[1.0, 5.0, 6.0], [2.0, 1.5, 6.0], [2.5, 1.0, 2.0]]
  # Corpus 0: 2.5 − 1.0; corpus 1: 1.0 − 1.5 (it improved).
  assert language.loss_forgetting(matrix) == pytest.approx(0.5 * (1.5 - 0.5))


def test_a_run_must_be_sound_before_anything_runs():
  with pytest.raises(ValueError, match="argument `method`.*'ewc'"):
    language.LanguageRun(corpora=("a",), method="ewc")
  with pytest.raises(ValueError, match="argument `epochs`"):
    language.LanguageRun(corpora=("a",), epochs=0)
  with pytest.raises(ValueError, match="argument `corpora`"):
    language.LanguageRun(corpora=())


# --- The app. ---------------------------------------------------------------

_app = app_runner.run_finetune


def _lm_flags(data, *corpus_names, preset=None):
  return [f"--init_model={preset or data['preset']}",
          "--task_dirs=" + ",".join(data[n] for n in corpus_names),
          f"--importance_data={data['licenses']}", "--lora_rank=2",
          "--epochs=2", "--batch_size=4", "--learning_rate=0.01",
          "--generate_length=8", "--checkpoint_seconds=0", "--verbose=0"]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_app_adapts_a_causal_lm_preset_and_resumes_as_uninterrupted(data):
  root = data["root"]
  flags = _lm_flags(data, "changelogs", "pairs")
  whole = _app(root / "whole", *flags)
  assert whole.returncode == 0, whole.stderr[-3000:]
  results = _results(root / "whole")
  assert results["corpora"] == ["changelogs", "pairs"]
  matrix = np.array(results["loss_matrix"])
  assert matrix.shape == (2, 2) and np.all(np.isfinite(matrix))
  np.testing.assert_allclose(results["perplexity_matrix"], np.exp(matrix))
  assert results["gain"][0] > 0  # It learned the first corpus.
  assert len(results["importance_data_loss"]) == 3
  assert results["config"]["lora_rank"] == 2
  # A causal LM's defaults: Ω over its mean, λ = 0.1 (benchmarks/STRENGTH.md).
  assert results["config"]["normalize_importance"] == "mean"
  assert results["config"]["strength"] == 0.1

  # The adapted model loads as any preset, without LoRA, and generates.
  adapted = keras_hub.models.CausalLM.from_preset(
      str(root / "whole" / "export" / "task_1"))
  assert isinstance(adapted, keras_hub.models.GemmaCausalLM)
  assert isinstance(adapted.generate("The", max_length=8), str)

  # TensorBoard: loss and perplexity per corpus, a sample per corpus.
  tags = _tensorboard_tags(root / "whole" / "tensorboard")
  assert {"next_token_loss/changelogs", "perplexity/pairs",
          "generate/changelogs", "generate/pairs"} <= tags

  # Stopped by SIGTERM inside the first corpus, then resumed.
  stopped = _app(root / "run", *flags, crash_at="sigterm:0")
  assert stopped.returncode == 75, stopped.stderr[-3000:]
  resumed = _app(root / "run", *flags, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  again = _results(root / "run")
  assert again["resumes"][0]["task"] == 0
  np.testing.assert_array_equal(again["loss_matrix"], results["loss_matrix"])
  np.testing.assert_array_equal(again["importance_data_loss"],
                                results["importance_data_loss"])


def _tensorboard_tags(folder):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in tf.io.gfile.glob(os.path.join(str(folder), "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


@pytest.mark.parametrize("change, flag", [
    (lambda d: [f"--task_dirs={d['root'] / 'empty'}"], "task_dirs"),
    (lambda d: [f"--task_dirs={_binary(d)}"], "task_dirs"),
    (lambda d: [f"--task_dirs={_jsonl(d['root'] / 'nofield', [{'q': 1}])}"],
     "task_dirs"),
    (lambda d: [f"--task_dirs={_class_folders(d)}"], "task_dirs"),
    (lambda d: ["--sequence_length=65", f"--init_model={d['gpt2']}"],
     "sequence_length"),
    # Each costs a process start (TensorFlow's import): the rest are slow.
    pytest.param(
        lambda d: ["--sequence_length=4", f"--task_dirs={d['pairs']}"],
        "sequence_length", marks=pytest.mark.slow),
    pytest.param(lambda d: [f"--importance_data={d['root'] / 'empty'}"],
                 "importance_data", marks=pytest.mark.slow),
    pytest.param(lambda d: ["--method=ewc"], "method",
                 marks=pytest.mark.slow),
    pytest.param(lambda d: ["--model=cnn"], "model", marks=pytest.mark.slow),
])
def test_app_bad_language_input_fails_in_one_line_before_training(
    data, change, flag):
  os.makedirs(data["root"] / "empty", exist_ok=True)
  workdir = data["root"] / f"bad_{flag}"
  given = _lm_flags(data, "apache") + change(data)
  result = _app(workdir, *given)
  assert result.returncode == 1, result.stderr[-2000:]
  (line,) = [l for l in result.stderr.splitlines() if l.strip()][-1:]
  assert line.startswith("error: ") and (
      f"Invalid value for argument `{flag}`" in line), result.stderr[-2000:]
  assert not os.path.exists(workdir / "checkpoints")


def _binary(d):
  folder = d["root"] / "binary"
  language_models.write_corpus(folder, "fine text")
  with open(folder / "image.txt", "wb") as f:
    f.write(bytes(range(256)))
  return folder


def _class_folders(d):
  language_models.write_corpus(d["root"] / "classes" / "good", "fine")
  language_models.write_corpus(d["root"] / "classes" / "bad", "awful")
  return d["root"] / "classes"


def test_app_refuses_corpora_for_a_classifier(data, tmp_path):
  result = _app(tmp_path / "run", f"--task_dirs={data['licenses']}",
                "--image_size=8")
  assert result.returncode == 1
  assert "Invalid value for argument `task_dirs`" in result.stderr
  assert "causal LM --init_model for text corpora" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", language_models.ARCHITECTURES)
def test_app_adapts_each_architecture(data, kind, tmp_path):
  preset = language_models.save_preset(kind, tmp_path / "preset")
  result = _app(tmp_path / "run", *_lm_flags(data, "changelogs", "pairs",
                                             preset=preset))
  assert result.returncode == 0, result.stderr[-3000:]
  results = _results(tmp_path / "run")
  assert np.all(np.isfinite(results["loss_matrix"]))
  net = keras.models.load_model(
      str(tmp_path / "run" / "checkpoints" / "task_1" / "model.keras"))
  assert net.consolidated_tasks == 3  # The importance corpus and two.
  # It trained: LoRA's B factors start at zero (on a model this small the
  # loss may barely move at rank 2).
  factors = [v for v in net.trainable_variables if "lora_kernel_b" in v.path]
  assert factors and all(np.any(keras.ops.convert_to_numpy(v) != 0)
                         for v in factors)
  adapted = keras_hub.models.CausalLM.from_preset(
      str(tmp_path / "run" / "export" / "task_1"))
  assert isinstance(adapted.generate("The", max_length=8), str)


@pytest.mark.slow
def test_jax_gives_the_same_table(data, tmp_path):
  pytest.importorskip("jax")
  # Full fine-tuning: LoRA's factors move this tiny model too little to
  # compare.
  flags = [f for f in _lm_flags(data, "changelogs")
           if not f.startswith(("--lora_rank", "--generate_length"))]
  flags.append("--generate_length=0")
  tables = []
  for backend in ("tensorflow", "jax"):
    result = _app(tmp_path / backend, *flags, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    tables.append(_results(tmp_path / backend))
  # The same data, steps and seeds; the backends' kernels and random
  # streams differ, and 2 epochs at a high learning rate amplify that: the
  # tables agree within 15 % of what training moved (7 % measured here).
  moved = tables[0]["gain"][0]
  assert moved > 0.3
  np.testing.assert_allclose(tables[1]["baseline"], tables[0]["baseline"],
                             atol=1e-4)
  for key in ("loss_matrix", "importance_data_loss"):
    np.testing.assert_allclose(tables[1][key], tables[0][key],
                               atol=0.15 * moved)
