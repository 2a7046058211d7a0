"""KerasHub task models as users hold them: presets, raw strings, LoRA."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mas
import tolerances

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
  tolerances.assert_all_close([np.array(o) for o in net.importances],
                              [np.array(e) for e in expected])
  assert all(float(np.max(np.array(o))) > 0 for o in net.importances)
  logits = net.predict(_TASK_B[0], verbose=0)
  assert logits.shape == (len(_TASK_B[0]), 2)
  tolerances.assert_close(logits, np.array(classifier(tokens := (
      classifier.preprocessor(tf.constant(_TASK_B[0]))))))
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


# --- The app: a local preset, LoRA, one new text folder. -------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APP = os.path.join(_ROOT, "apps", "sequential_finetune.py")


def _text_folder(folder, texts, labels, names=("negative", "positive")):
  for k, (text, label) in enumerate(zip(texts, labels)):
    os.makedirs(os.path.join(folder, names[label]), exist_ok=True)
    with open(os.path.join(folder, names[label], f"{k}.txt"), "w",
              encoding="utf-8") as f:
      f.write(text)


def _run_app(*flags):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, _APP, *flags], capture_output=True,
                        text=True, env=env, timeout=600, check=False)


@pytest.fixture(name="text_data")
def _text_data(tmp_path):
  _text_folder(str(tmp_path / "old"), *_TASK_A)
  _text_folder(str(tmp_path / "new"), *_TASK_B)
  _text_folder(str(tmp_path / "three"), ["good", "bad", "plot"] * 4,
               [0, 1, 2] * 4, names=("a", "b", "c"))
  return tmp_path


def test_app_adapts_a_preset_with_lora_to_one_new_text_folder(preset,
                                                              text_data):
  workdir = str(text_data / "run")
  done = _run_app(f"--workdir={workdir}", f"--init_model={preset}",
                  "--lora_rank=2", f"--task_dirs={text_data / 'new'}",
                  f"--importance_data={text_data / 'old'}", "--scenario=domain",
                  "--epochs=2", "--batch_size=8", "--strength=1")
  assert done.returncode == 0, done.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["tasks"] == ["new"]
  assert results["config"]["lora_rank"] == 2
  assert len(results["importance_data_accuracy"]) == 2
  assert "accuracy on the importance data: before" in done.stdout
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  served = tf.saved_model.load(os.path.join(workdir, "export", "task_0"))
  logits = served.serve(tf.constant(["good movie", "the cat sat"]))
  assert tuple(logits.shape) == (2, 2)
  # The checkpoint holds the LoRA model: it resumes as it was.
  again = _run_app(f"--workdir={workdir}", f"--init_model={preset}",
                   "--lora_rank=2", f"--task_dirs={text_data / 'new'}",
                   f"--importance_data={text_data / 'old'}",
                   "--scenario=domain", "--epochs=2", "--batch_size=8",
                   "--strength=1", "--resume")
  assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("change, message", [
    ({"--init_model": "{backbone}"}, "argument `init_model`.*backbone alone"),
    ({"--task_dirs": "{data}/three"}, "argument `init_model`.*at least 3"),
    ({"--init_model": "{image_model}"}, "argument `init_model`.*text"),
    ({"--task_dirs": "{images}", "--image_size": "8,8"},
     "argument `init_model`.*preprocessor takes the tasks' inputs \\(images"),
    ({"--lora_rank": "0"}, "lora_rank"),
])
def test_app_bad_hub_input_fails_before_training(preset, text_data, change,
                                                 message):
  import re  # pylint: disable=g-import-not-at-top
  backbone = str(text_data / "backbone_preset")
  keras_hub.models.Backbone.from_preset(preset).save_to_preset(backbone)
  image_model = str(text_data / "mlp.keras")
  keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                    keras.layers.Dense(2)]).save(image_model)
  images = str(text_data / "images")
  for c in ("a", "b"):
    os.makedirs(os.path.join(images, c))
    for i in range(4):
      keras.utils.save_img(os.path.join(images, c, f"{i}.png"),
                           np.full((8, 8, 1), 40 * i, "uint8"), scale=False)
  flags = {"--workdir": "{data}/run", "--init_model": preset,
           "--task_dirs": "{data}/new", "--scenario": "domain",
           "--epochs": "1", "--verbose": "0", **change}
  done = _run_app(*(f"{k}=" + v.format(data=text_data, backbone=backbone,
                                        image_model=image_model,
                                        images=images)
                    for k, v in flags.items()))
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  lines = [l for l in done.stderr.splitlines() if re.search(message, l)]
  assert len(lines) == 1, done.stderr[-3000:]
  assert not os.path.exists(str(text_data / "run"))


# --- A causal language model learns a second domain. -----------------------

def _example():
  """examples/causal_lm_domains.py: its model builder and its two domains."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "causal_lm_domains",
      os.path.join(_ROOT, "examples", "causal_lm_domains.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_EXAMPLE = _example()
_DOMAIN_A, _DOMAIN_B = _EXAMPLE.DOMAIN_A, _EXAMPLE.DOMAIN_B
_causal_lm = _EXAMPLE.causal_lm


def test_causal_lm_importance_sums_the_real_tokens_logits():
  lm = _causal_lm()
  net = keras_mas.MASModel.from_model(lm)
  x = lm.preprocessor(tf.constant(["my cat sat", "the cat", "a cat ran"]))[0]
  assert not np.all(np.array(x["padding_mask"]))  # Some padding to ignore.
  measured = keras_mas.importance.mas(net, x)
  variables = net.trainable_variables
  expected = [np.zeros(v.shape) for v in variables]
  for k in range(3):
    sample = {name: t[k:k + 1] for name, t in x.items()}
    with tf.GradientTape() as tape:
      logits = lm(sample, training=False)
      mask = tf.cast(sample["padding_mask"], logits.dtype)[:, :, None]
      objective = tf.reduce_sum(tf.square(logits * mask))
    for e, g in zip(expected, tape.gradient(objective, variables)):
      e += np.abs(np.array(tf.convert_to_tensor(g))) / 3
  # A variable whose true gradient vanishes (attention's key bias: softmax
  # ignores a shift shared by all keys) holds rounding noise only.
  floor = 1e-5 * max(float(np.max(e)) for e in expected)
  for v, m, e in zip(variables, measured, expected):
    np.testing.assert_allclose(np.array(m), e, rtol=2e-4, atol=floor,
                               err_msg=v.path)


# The behaviour on a causal LM (the app's route is language_test's).
@pytest.mark.slow
def test_causal_lm_forgets_the_old_domain_less_with_mas(tmp_path):
  lm = _causal_lm()
  net = keras_mas.MASModel.from_model(lm)
  net.compile(keras.optimizers.Adam(3e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              weighted_metrics=[])
  net.fit(_DOMAIN_A, epochs=10, batch_size=8, verbose=0)
  net.consolidate(_DOMAIN_A, strength=0.0)  # Ω from raw strings.
  trained = str(tmp_path / "domain_a.weights.h5")
  net.save_weights(trained)  # With Ω and θ*.

  def old_and_new_loss(strength):
    net.load_weights(trained)
    net.strength = strength
    net.reset_optimizer()
    before_b = net.evaluate(_DOMAIN_B, verbose=0, return_dict=True)
    net.fit(_DOMAIN_B, epochs=5, batch_size=8, verbose=0)
    after = [net.evaluate(d, verbose=0, return_dict=True)["task_loss"]
             for d in (_DOMAIN_A, _DOMAIN_B)]
    return after + [before_b["task_loss"]]

  old_before = net.evaluate(_DOMAIN_A, verbose=0,
                            return_dict=True)["task_loss"]
  finetune_old, finetune_new, _ = old_and_new_loss(0.0)
  mas_old, mas_new, new_before = old_and_new_loss(0.3)
  # The old domain's next-token loss rises less, the new one is learned.
  assert mas_old - old_before < 0.5 * (finetune_old - old_before), (
      old_before, mas_old, finetune_old)
  assert mas_new < new_before, (mas_new, new_before, finetune_new)
  generated = lm.generate("the cat", max_length=12)
  assert isinstance(generated, str) and generated.startswith("the cat")


def test_an_image_classifier_takes_raw_images_of_any_size(tmp_path):
  # Its preprocessor resizes and rescales; BatchNormalization inside.
  keras.utils.set_random_seed(0)
  backbone = keras_hub.models.ResNetBackbone(
      input_conv_filters=[64], input_conv_kernel_sizes=[3],
      stackwise_num_filters=[64], stackwise_num_blocks=[1],
      stackwise_num_strides=[1], block_type="basic_block",
      use_pre_activation=False, image_shape=(16, 16, 3))
  classifier = keras_hub.models.ResNetImageClassifier(
      backbone, num_classes=2,
      preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(
          image_converter=keras_hub.layers.ResNetImageConverter(
              image_size=(16, 16), scale=1 / 255.0)))
  x = np.random.default_rng(0).integers(0, 255, (16, 24, 24, 3)).astype(
      "float32")
  y = np.arange(16) % 2
  net = keras_mas.MASModel.from_model(classifier)
  net.compile("adam",
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  net.fit(x, y, epochs=1, batch_size=8, verbose=0)
  net.consolidate(x, strength=1.0)
  expected = keras_mas.importance.mas(
      net, classifier.preprocessor(tf.constant(x)))
  tolerances.assert_all_close([np.array(o) for o in net.importances],
                              [np.array(e) for e in expected])
  path = str(tmp_path / "images.keras")
  net.save(path)
  restored = keras.models.load_model(path)
  np.testing.assert_allclose(restored.predict(x[:4], verbose=0),
                             net.predict(x[:4], verbose=0), atol=1e-5)
