"""LoRA models keep training after any load, and KerasHub LMs round-trip.

Keras saves a LoRA layer with its update merged into the kernel and zeroes
both factors on loading, after which they get no gradient: these tests
fail on a model that trains nothing after `load_weights`, a `.keras` load or
an in-task resume.
"""

import json
import os
import warnings

import keras
import numpy as np
import pytest

import app_runner  # pylint: disable=g-bad-import-order
import keras_mas
from keras_mas.core import exact_state

keras_hub = pytest.importorskip("keras_hub")

_RNG = np.random.default_rng(0)
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

_VOCABULARY = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
               + "the a cat dog sat ran on mat good bad movie film".split())
_TEXTS = np.array(["the cat sat", "a dog ran", "good movie", "bad film",
                   "the dog sat on mat", "a good film"] * 3)
_LABELS = np.array([0, 1, 1, 0, 1, 0] * 3)


def _bert_classifier():
  """A KerasHub TextClassifier with its preprocessor: dropout, biases."""
  keras.utils.set_random_seed(0)
  tokenizer = keras_hub.models.BertTokenizer(vocabulary=_VOCABULARY)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=len(_VOCABULARY), num_layers=1, num_heads=2,
      hidden_dim=8, intermediate_dim=16, max_sequence_length=8)
  return keras_hub.models.BertTextClassifier(
      backbone, num_classes=2,
      preprocessor=keras_hub.models.BertTextClassifierPreprocessor(
          tokenizer, sequence_length=8))


def _llama3():
  """A Llama 3 CausalLM on token ids: no biases, untied embeddings."""
  keras.utils.set_random_seed(0)
  backbone = keras_hub.models.Llama3Backbone(
      vocabulary_size=40, num_layers=2, num_query_heads=2,
      num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
  return keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)


def _gpt2():
  """A GPT-2 CausalLM on token ids: biases, tied embeddings, dropout."""
  keras.utils.set_random_seed(0)
  backbone = keras_hub.models.GPT2Backbone(
      vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=16,
      intermediate_dim=32, max_sequence_length=8)
  return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


_TOKENS = _RNG.integers(1, 40, size=(12, 9)).astype("int32")
_LM_DATA = ({"token_ids": _TOKENS[:, :-1],
             "padding_mask": np.ones((12, 8), "int32")}, _TOKENS[:, 1:])
_CLASSIFIER_DATA = (_TEXTS, _LABELS)

_MODELS = {"causal_lm": (_llama3, _LM_DATA),
           "text_classifier": (_bert_classifier, _CLASSIFIER_DATA)}


def _wrapped(build, rank=2):
  task = build()
  task.backbone.enable_lora(rank)
  net = keras_mas.MASModel.from_model(task)
  net.compile(keras.optimizers.Adam(1e-2), _LOSS)
  return net


def _fit(net, data, epochs):
  keras.utils.set_random_seed(1)  # The same batches and dropout each time.
  net.fit(*data, epochs=epochs, batch_size=4, verbose=0)


def _values(variables):
  return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def _lora_factors(net):
  return [v for v in net.trainable_variables if "lora_kernel" in v.path]


@pytest.mark.parametrize("route", ["load_weights", "load_model"])
@pytest.mark.parametrize("kind", sorted(_MODELS))
def test_lora_model_trains_on_after_a_load_as_it_would_have(kind, route,
                                                            tmp_path):
  build, data = _MODELS[kind]
  net = _wrapped(build)
  _fit(net, data, 1)
  net.consolidate(data[0], strength=0.1)
  saved = _values(net.variables)
  if route == "load_weights":
    path = str(tmp_path / "net.weights.h5")
    net.save_weights(path)
  else:
    path = str(tmp_path / "net.keras")
    net.save(path)
  _fit(net, data, 2)
  uninterrupted = _values(net.trainable_variables)

  if route == "load_weights":
    loaded = _wrapped(build)
    # As in any Keras model, the optimizer's state loads into a built one.
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
  else:
    loaded = keras.models.load_model(path)
  # Everything as saved, the factors and the kernels under them included.
  assert len(loaded.variables) == len(saved)
  for variable, value in zip(loaded.variables, saved):
    np.testing.assert_array_equal(_values([variable])[0], value,
                                  err_msg=variable.path)
  before = _values(_lora_factors(loaded))
  assert all(np.any(b) for b in before)
  _fit(loaded, data, 2)
  after = _values(_lora_factors(loaded))
  assert all(not np.array_equal(a, b) for a, b in zip(after, before))
  for variable, want in zip(loaded.trainable_variables, uninterrupted):
    np.testing.assert_array_equal(_values([variable])[0], want,
                                  err_msg=variable.path)


@pytest.mark.parametrize("build", [_llama3, _gpt2], ids=["llama3", "gpt2"])
def test_causal_lm_without_preprocessor_survives_the_keras_round_trip(
    build, tmp_path):
  lm = build()
  net = keras_mas.MASModel.from_model(lm)
  # A KerasHub task is rebuilt by its own class, not from its graph (which
  # would copy the token embedding it reuses from its backbone).
  assert isinstance(net, keras_mas.WrappedMASModel) and net.model is lm
  net.compile(keras.optimizers.Adam(1e-2), _LOSS)
  net.fit(*_LM_DATA, epochs=1, batch_size=4, verbose=0)
  net.consolidate(_LM_DATA[0], strength=0.5)
  path = str(tmp_path / "lm.keras")
  net.save(path)
  restored = keras.models.load_model(path)
  assert type(restored.model) is type(lm)
  assert restored.strength == 0.5 and restored.consolidated_tasks == 1
  assert len(restored.variables) == len(net.variables)
  for a, b in zip(restored.variables, net.variables):
    np.testing.assert_array_equal(_values([a])[0], _values([b])[0],
                                  err_msg=b.path)
  np.testing.assert_array_equal(restored.predict(_LM_DATA[0], verbose=0),
                                net.predict(_LM_DATA[0], verbose=0))
  assert float(restored.mas_penalty()) == float(net.mas_penalty())


def test_a_file_with_merged_factors_only_warns_that_lora_is_stuck(
    tmp_path, monkeypatch):
  net = _wrapped(_llama3)
  _fit(net, _LM_DATA, 1)
  path = str(tmp_path / "merged_only.weights.h5")
  # As Keras alone (or keras_mas before LoRA was kept) writes it.
  monkeypatch.setattr(exact_state.ExactState, "save_own_variables",
                      lambda self, store: None)
  net.save_weights(path)
  monkeypatch.undo()
  loaded = _wrapped(_llama3)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded.load_weights(path)
  messages = [str(w.message) for w in caught if "LoRA layers" in
              str(w.message)]
  assert len(messages) == 1 and "get no gradient" in messages[0]


def test_an_entry_for_other_lora_layers_is_refused():
  lm = _llama3()
  lm.backbone.enable_lora(2, target_layer_names=["query"])
  entry = exact_state.ExactState(lm)
  saved = {str(i): v for i, v in enumerate(entry._variables())}  # pylint: disable=protected-access
  del saved[str(len(saved) - 1)]  # As if saved with LoRA on one layer less.
  with pytest.raises(ValueError, match="Enable LoRA as it was"):
    entry.load_own_variables(saved)


# --- The app: a LoRA run stopped inside its task resumes as it would have. -

def _app(workdir, preset, data, *extra, stop=False):
  return app_runner.run_finetune(
      workdir, f"--init_model={preset}", "--lora_rank=2",
      f"--task_dirs={data / 'new'}", f"--importance_data={data / 'old'}",
      "--scenario=domain", "--epochs=3", "--batch_size=4",
      "--checkpoint_seconds=0", "--strength=1", "--verbose=0", *extra,
      # SIGTERM after the task's first checkpoint inside it.
      crash_at="sigterm:0" if stop else None, timeout=600)


def _text_folder(folder, texts, labels):
  for k, (text, label) in enumerate(zip(texts, labels)):
    os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
    with open(os.path.join(folder, str(label), f"{k}.txt"), "w",
              encoding="utf-8") as f:
      f.write(text)


def _final(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  model = keras.models.load_model(
      os.path.join(workdir, "checkpoints", "task_0", "model.keras"))
  return results, _values(model.trainable_variables + model.importances
                          + model.anchors)


# language_test stops and resumes a LoRA causal LM's app run in the fast
# suite; this classifier's run is slow.
@pytest.mark.slow
def test_app_lora_run_stopped_inside_its_task_resumes_as_uninterrupted(
    tmp_path):
  preset = str(tmp_path / "preset")
  _bert_classifier().save_to_preset(preset)
  _text_folder(str(tmp_path / "old"), _TEXTS[:6], _LABELS[:6])
  _text_folder(str(tmp_path / "new"), _TEXTS[::-1], _LABELS[::-1])

  whole = _app(str(tmp_path / "whole"), preset, tmp_path)
  assert whole.returncode == 0, whole.stderr[-3000:]
  stopped = _app(str(tmp_path / "run"), preset, tmp_path, stop=True)
  assert stopped.returncode == 75, stopped.stderr[-3000:]
  resumed = _app(str(tmp_path / "run"), preset, tmp_path, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  results, state = _final(str(tmp_path / "run"))
  expected_results, expected_state = _final(str(tmp_path / "whole"))
  (resume,) = results["resumes"]
  assert resume["epoch"] == 1 and resume["batch"] > 0
  np.testing.assert_array_equal(results["accuracy_matrix"],
                                expected_results["accuracy_matrix"])
  assert len(state) == len(expected_state)
  for got, want in zip(state, expected_state):
    np.testing.assert_array_equal(got, want)
