r"""Models users bring, trained through two tasks with MAS, in a subprocess.

  python tests/model_zoo.py transformer [--mixed_precision]

Builds one model (small, random weights, no download), wraps it with
`MASModel.from_model`, trains a task, consolidates with exact MAS, checks the
importance against a per-example GradientTape loop on a few samples, trains
a second task with the penalty, and measures local MAS and the Fisher. It
prints one JSON line of findings; `model_zoo_test.py` runs it in a fresh
process so that a crash (TF can kill the interpreter) fails a test instead
of ending pytest.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mas
from keras_mas import importance
from keras_mas import per_sample

_SAMPLES = 24


def _ids(rng, shape, vocabulary):
  return rng.integers(1, vocabulary, size=shape).astype("int32")


def transformer(rng):
  """Embedding + MultiHeadAttention + LayerNormalization encoder block."""
  tokens = keras.Input((8,), dtype="int32")
  x = keras.layers.Embedding(40, 16)(tokens)
  attended = keras.layers.MultiHeadAttention(2, 8, dropout=0.1)(x, x)
  x = keras.layers.LayerNormalization()(x + attended)
  hidden = keras.layers.Dense(32, activation="gelu")(x)
  x = keras.layers.LayerNormalization()(x + keras.layers.Dense(16)(hidden))
  x = keras.layers.GlobalAveragePooling1D()(x)
  model = keras.Model(tokens, keras.layers.Dense(3)(x))
  return model, _ids(rng, (_SAMPLES, 8), 40)


def mobilenet(rng):
  """keras.applications MobileNetV2: BatchNorm, depthwise convolutions."""
  backbone = keras.applications.MobileNetV2(
      input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None,
      pooling="avg")
  outputs = keras.layers.Dense(3)(backbone.output)
  model = keras.Model(backbone.input, outputs)
  return model, rng.normal(size=(_SAMPLES, 32, 32, 3)).astype("float32")


def recurrent(rng):
  """Stacked LSTM and GRU over numeric sequences."""
  model = keras.Sequential([
      keras.Input((6, 4)),
      keras.layers.LSTM(8, return_sequences=True),
      keras.layers.GRU(6),
      keras.layers.Dense(3),
  ])
  return model, rng.normal(size=(_SAMPLES, 6, 4)).astype("float32")


def text_cnn(rng):
  """Embedding, Conv1D, global max pooling."""
  model = keras.Sequential([
      keras.Input((12,), dtype="int32"),
      keras.layers.Embedding(50, 8),
      keras.layers.Conv1D(12, 3, activation="relu"),
      keras.layers.GlobalMaxPooling1D(),
      keras.layers.Dropout(0.2),
      keras.layers.Dense(3),
  ])
  return model, _ids(rng, (_SAMPLES, 12), 50)


def keras_hub_bert(rng):
  """A KerasHub BERT backbone from a config (random weights) with a head."""
  import keras_hub
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=30, num_layers=2, num_heads=2, hidden_dim=8,
      intermediate_dim=16, max_sequence_length=6)
  pooled = backbone.output["pooled_output"]
  model = keras.Model(backbone.input, keras.layers.Dense(3)(pooled))
  x = {
      "token_ids": _ids(rng, (_SAMPLES, 6), 30),
      "segment_ids": np.zeros((_SAMPLES, 6), "int32"),
      "padding_mask": np.ones((_SAMPLES, 6), "int32"),
  }
  return model, x


MODELS = {f.__name__: f for f in (transformer, mobilenet, recurrent, text_cnn,
                                  keras_hub_bert)}


def _reference(model, x, count):
  """Exact MAS on `count` samples: one GradientTape per sample."""
  variables = model.trainable_variables
  totals = [np.zeros(v.shape) for v in variables]
  for k in range(count):
    sample = tf.nest.map_structure(lambda t, k=k: t[k:k + 1], x)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(importance.squared_output_norm(
          model(sample, training=False)))
    for t, g in zip(totals, tape.gradient(loss, variables,
                                          unconnected_gradients="zero")):
      t += np.abs(tf.convert_to_tensor(g).numpy())
  return [t / count for t in totals]


def _relative_error(actual, expected):
  """Worst error per variable, relative to that variable's largest value.

  A variable whose true gradient vanishes (the key bias of attention:
  softmax ignores a shift shared by all keys) holds rounding noise only;
  errors are measured against at least 1e-3 of the largest importance.
  """
  floor = 1e-3 * max(float(np.max(np.abs(e))) for e in expected)
  worst = 0.0
  for a, e in zip(actual, expected):
    a = np.asarray(a, "float64")
    worst = max(worst, float(np.max(np.abs(a - e)) / max(
        np.max(np.abs(e)), floor)))
  return worst


def run(name, mixed_precision=False):
  if mixed_precision:
    keras.mixed_precision.set_global_policy("mixed_float16")
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  model, x = MODELS[name](rng)
  y_a = rng.integers(0, 3, size=_SAMPLES)
  y_b = rng.integers(0, 3, size=_SAMPLES)
  net = keras_mas.MASModel.from_model(model)
  findings = {"model": name, "mixed_precision": mixed_precision,
              "units": sorted({type(u).__name__ for u in per_sample.plan(
                  net, net.trainable_variables)})}

  def compile_():
    net.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))

  compile_()
  net.fit(x, y_a, epochs=1, batch_size=8, verbose=0)
  if not mixed_precision:
    count = 3
    sub = tf.nest.map_structure(lambda t: t[:count], x)
    findings["relative_error"] = _relative_error(
        importance.mas(net, sub), _reference(net, x, count))
  net.consolidate(x, strength=1.0)
  omega = [np.asarray(o) for o in net.importances]
  findings["importance_finite"] = bool(all(np.all(np.isfinite(o))
                                           for o in omega))
  findings["importance_nonnegative"] = bool(all(np.all(o >= 0)
                                                for o in omega))
  findings["measured_fraction"] = float(np.mean([np.any(o > 0)
                                                 for o in omega]))
  compile_()
  history = net.fit(x, y_b, epochs=2, batch_size=8, verbose=0).history
  findings["penalty"] = [float(p) for p in history["mas_penalty"]]
  findings["loss_finite"] = bool(np.all(np.isfinite(history["loss"])))
  # MobileNet's graph is the largest here: its local MAS and Fisher
  # traces would double the test's time for forms already covered.
  for method in () if name == "mobilenet" else ("local_mas", "fisher"):
    data = (x, y_b) if method == "fisher" else x
    values = getattr(importance, method)(net, data)
    findings[f"{method}_finite"] = bool(all(
        np.all(np.isfinite(np.asarray(v))) for v in values))
  return findings


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1], "--mixed_precision" in sys.argv)))
