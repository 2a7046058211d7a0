"""KerasHub task models as users hold them: presets, raw strings, LoRA."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mas

keras_hub = pytest.importorskip("keras_hub")

_VOCABULARY = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
               + "the a cat dog sat ran on mat fast slow good bad movie film "
               "was is great awful plot actor".split())
_TASK_A = (np.array(["the cat sat", "a dog ran", "the dog sat on mat",
                     "a cat ran fast"] * 4),
           np.array([0, 1, 1, 0] * 4))
_TASK_B = (np.array(["good movie", "bad film", "great plot", "awful actor",
                     "the film was good", "the movie is bad"] * 3),
           np.array([1, 0, 1, 0, 1, 0] * 3))


@pytest.fixture(name="preset", scope="module")
def _preset(tmp_path_factory):
  """A local preset directory of a tiny BERT classifier (random weights)."""
  keras.utils.set_random_seed(0)
  tokenizer = keras_hub.models.BertTokenizer(vocabulary=_VOCABULARY,
                                             lowercase=True)
  preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
      tokenizer, sequence_length=8)
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=len(_VOCABULARY), num_layers=1, num_heads=2,
      hidden_dim=8, intermediate_dim=16, max_sequence_length=8)
  classifier = keras_hub.models.BertTextClassifier(
      backbone, num_classes=2, preprocessor=preprocessor)
  path = str(tmp_path_factory.mktemp("bert_preset"))
  classifier.save_to_preset(path)
  return path


def _adapted(preset, lora_rank=None):
  """The preset's classifier, wrapped, trained on task A and consolidated."""
  keras.utils.set_random_seed(0)
  classifier = keras_hub.models.TextClassifier.from_preset(preset)
  if lora_rank:
    classifier.backbone.enable_lora(lora_rank)
  net = keras_mas.MASModel.from_model(classifier)
  net.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
  net.fit(*_TASK_A, epochs=2, batch_size=8, verbose=0)
  net.consolidate(_TASK_A[0], strength=1.0)
  return classifier, net


def test_a_text_classifier_takes_raw_strings_everywhere(preset):
  classifier, net = _adapted(preset)
  assert net.preprocessor is classifier.preprocessor
  # Importance through the preprocessor = importance on what it makes.
  tokens = classifier.preprocessor(tf.constant(_TASK_A[0]))
  expected = keras_mas.importance.mas(net, tokens)
  for omega, want in zip(net.importances, expected):
    np.testing.assert_allclose(np.array(omega), np.array(want), rtol=1e-5,
                               atol=1e-9)
  assert all(float(np.max(np.array(o))) > 0 for o in net.importances)
  logits = net.predict(_TASK_B[0], verbose=0)
  assert logits.shape == (len(_TASK_B[0]), 2)
  np.testing.assert_allclose(logits, np.array(classifier(tokens := (
      classifier.preprocessor(tf.constant(_TASK_B[0]))))), rtol=1e-5)
  del tokens
  history = net.fit(*_TASK_B, epochs=1, batch_size=6, verbose=0)
  assert history.history["mas_penalty"][0] > 0  # The penalty is active.
  results = net.evaluate(*_TASK_B, verbose=0, return_dict=True)
  assert {"loss", "accuracy"} <= set(results)
  with pytest.raises(ValueError, match="argument `validation_split`"):
    net.fit(*_TASK_B, validation_split=0.5, verbose=0)


def test_lora_state_covers_what_trains_and_frozen_weights_stay(preset):
  classifier, net = _adapted(preset, lora_rank=2)
  trainable = classifier.trainable_variables
  assert any("lora_kernel_a" in v.path for v in trainable)
  assert len(net.importances) == len(trainable) == len(net.anchors)
  for (v, omega, anchor), t in zip(net.mas_variables, trainable):
    assert v is t and omega.shape == t.shape == anchor.shape
  frozen = [(v.path, np.array(v)) for v in classifier.non_trainable_variables
            if "kernel" in v.path or "embeddings" in v.path]
  assert frozen
  net.reset_optimizer()
  history = net.fit(*_TASK_B, epochs=2, batch_size=6, verbose=0)
  assert history.history["mas_penalty"][-1] > 0
  after = {v.path: np.array(v) for v in classifier.non_trainable_variables}
  for path, before in frozen:
    np.testing.assert_array_equal(after[path], before, err_msg=path)
  state = sum(int(np.prod(v.shape)) for v in net.importances + net.anchors)
  assert state == 2 * sum(int(np.prod(v.shape)) for v in trainable)


def test_keras_round_trip_keeps_the_state_and_the_preprocessor(preset,
                                                               tmp_path):
  _, net = _adapted(preset, lora_rank=2)
  path = str(tmp_path / "adapted.keras")
  net.save(path)
  restored = keras.models.load_model(path)
  assert isinstance(restored, keras_mas.MASModel)
  assert restored.preprocessor is not None
  assert restored.strength == 1.0 and restored.consolidated_tasks == 1
  for a, b in zip(net.importances + net.anchors,
                  restored.importances + restored.anchors):
    np.testing.assert_array_equal(np.array(a), np.array(b))
  np.testing.assert_allclose(restored.predict(_TASK_B[0], verbose=0),
                             net.predict(_TASK_B[0], verbose=0), rtol=1e-5)
  assert os.path.getsize(path) > 0
