"""Language models' layers in closed form, against a per-example loop.

KerasHub's causal LMs are made of `EinsumDense`/`Dense` projections, a
`ReversibleEmbedding` read forward (token rows) and in reverse (logits,
tied or not, soft-capped or not), a learned `PositionEmbedding` (GPT-2) and
RMS norms of their own (Llama, Gemma, Qwen, Mistral): each of these has a
closed form, so no layer of theirs is re-run one sample at a time.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_mas
from keras_mas import importance
from keras_mas import per_sample
import tolerances

keras_hub = pytest.importorskip("keras_hub")

_RNG = np.random.default_rng(0)
_VOCABULARY, _LENGTH = 23, 6
_SMALL = dict(num_layers=1, hidden_dim=8, intermediate_dim=16)
_GQA = dict(_SMALL, num_query_heads=2, num_key_value_heads=1)


def _causal_lm(name):
  keras.utils.set_random_seed(0)
  models = keras_hub.models
  if name == "gpt2":
    backbone = models.GPT2Backbone(_VOCABULARY, num_heads=2,
                                   max_sequence_length=_LENGTH, **_SMALL)
    return models.GPT2CausalLM(backbone=backbone, preprocessor=None)
  if name.startswith("llama3"):
    backbone = models.Llama3Backbone(
        _VOCABULARY, tie_word_embeddings=name == "llama3_tied", **_GQA)
    return models.Llama3CausalLM(backbone=backbone, preprocessor=None)
  if name == "gemma":
    backbone = models.GemmaBackbone(_VOCABULARY, head_dim=4, **_GQA)
    return models.GemmaCausalLM(backbone=backbone, preprocessor=None)
  if name == "gemma3_soft_cap":
    backbone = models.Gemma3Backbone(
        _VOCABULARY, image_size=16, head_dim=4, vision_encoder=None,
        final_logit_soft_cap=30.0, **_GQA)
    return models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
  if name == "qwen3":
    backbone = models.Qwen3Backbone(_VOCABULARY, head_dim=4, **_GQA)
    return models.Qwen3CausalLM(backbone=backbone, preprocessor=None)
  if name == "mistral":
    backbone = models.MistralBackbone(_VOCABULARY, **_GQA)
    return models.MistralCausalLM(backbone=backbone, preprocessor=None)
  raise ValueError(name)


def _tokens(samples):
  ids = _RNG.integers(1, _VOCABULARY, size=(samples, _LENGTH)).astype("int32")
  ids[0, :3] = 5  # One sample reads row 5 three times.
  mask = np.ones((samples, _LENGTH), bool)
  mask[1, 4:] = False  # Padding: its logits are not measured.
  return {"token_ids": ids, "padding_mask": mask}


def _reference(model, x, loss_fn):
  """The definition: `mean_k |∂ loss_fn(model(x_k), x_k) / ∂θ|`."""
  variables = model.trainable_variables
  totals = [np.zeros(v.shape) for v in variables]
  n = len(tf.nest.flatten(x)[0])
  for k in range(n):
    sample = tf.nest.map_structure(lambda t, k=k: t[k:k + 1], x)
    with tf.GradientTape() as tape:
      loss = loss_fn(model(sample, training=False), sample)
    for t, g in zip(totals, tape.gradient(
        loss, variables, unconnected_gradients="zero")):
      t += np.abs(tf.convert_to_tensor(g).numpy().astype("float64"))
  return [t / n for t in totals]


def _masked_logits_norm(logits, sample):
  mask = tf.cast(sample["padding_mask"], logits.dtype)[:, :, None]
  return tf.reduce_sum(tf.square(logits * mask))


def _assert_close(actual, expected):
  # Attention's key bias gets no gradient in exact arithmetic (softmax is
  # unchanged by a shift): it holds rounding noise, compared at the scale
  # of all the arrays.
  floor = tolerances.ATOL_OF_SCALE * max(np.max(np.abs(e)) for e in expected)
  for i, (a, e) in enumerate(zip(actual, expected)):
    tolerances.assert_close(a, e, rtol=1e-4, atol=max(
        1e-4 * np.max(np.abs(e)), floor), err_msg=f"entry {i}")


@pytest.mark.parametrize("name", ["gpt2", "llama3_tied", "llama3_untied",
                                  "gemma", "gemma3_soft_cap", "qwen3",
                                  "mistral"])
def test_causal_lm_importance_has_no_per_sample_loop(name):
  model = _causal_lm(name)
  x = _tokens(5)
  kinds = {type(u).__name__ for u in per_sample.plan(
      model, model.trainable_variables)}
  assert "ReversibleEmbeddingUnit" in kinds
  assert not kinds & {"Fallback", "ModelFallback"}, kinds
  _assert_close(importance.mas(model, x, batch_size=3),
                _reference(model, x, _masked_logits_norm))


class _RMSNorm(keras.layers.Layer):
  """A user's RMS norm, `x̂·(offset + γ)`, or `x̂·γ²` (not of that form)."""

  def __init__(self, offset=0.0, squared=False, **kwargs):
    super().__init__(**kwargs)
    self.offset, self.squared, self.epsilon = offset, squared, 1e-5

  def build(self, input_shape):
    self.gamma = self.add_weight(shape=(input_shape[-1],),
                                 initializer="ones")

  def call(self, x):
    x = x * keras.ops.rsqrt(
        keras.ops.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
    gamma = self.gamma * self.gamma if self.squared else self.gamma
    return x * (self.offset + gamma)


@pytest.mark.parametrize("offset,squared,kind", [
    (0.0, False, "RMSScaleUnit"), (1.0, False, "RMSScaleUnit"),
    # x̂·γ² equals x̂·γ at γ = 1 (its initial value): it is told apart by
    # the random γ of the probe, and keeps the per-sample loop.
    (0.0, True, "Fallback")])
def test_rms_norms_are_recognised_by_trying(offset, squared, kind):
  keras.utils.set_random_seed(1)
  norm = _RMSNorm(offset, squared)
  model = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(4), norm,
                            keras.layers.Dense(2)])
  norm.gamma.assign(_RNG.normal(size=4).astype("float32"))
  kinds = [type(u).__name__ for u in per_sample.plan(
      model, model.trainable_variables)]
  assert kinds == ["DenseUnit", kind, "DenseUnit"]
  x = _RNG.normal(size=(5, 3, 4)).astype("float32")
  _assert_close(importance.mas(model, x, batch_size=2),
                _reference(model, x, lambda out, _: tf.reduce_sum(out * out)))


@pytest.mark.parametrize("tie", [True, False])
def test_local_mas_of_a_reversible_embedding_sums_both_calls(tie):
  # ids → token rows → logits through the same table: local MAS measures
  # the table on each of its own outputs, from that call's own inputs,
  # each sample's gradients of both calls added before |·|.
  keras.utils.set_random_seed(2)
  table = keras.layers.ReversibleEmbedding(_VOCABULARY, 4, tie_weights=tie,
                                           logit_soft_cap=5.0)
  ids = keras.Input((_LENGTH,), dtype="int32")
  model = keras.Model(ids, table(table(ids), reverse=True))
  x = _tokens(4)["token_ids"]
  expected = [np.zeros(v.shape) for v in model.trainable_variables]
  for k in range(len(x)):
    hidden = tf.constant(table(x[k:k + 1]).numpy())  # A fixed input.
    with tf.GradientTape() as tape:
      rows = table(x[k:k + 1])
      logits = table(hidden, reverse=True)
      loss = tf.reduce_sum(rows * rows) + tf.reduce_sum(logits * logits)
    for e, g in zip(expected, tape.gradient(
        loss, model.trainable_variables, unconnected_gradients="zero")):
      e += np.abs(tf.convert_to_tensor(g).numpy()) / len(x)
  _assert_close(importance.local_mas(model, x, batch_size=3), expected)


def test_a_wrapped_causal_lm_is_batched_by_its_logits():
  # Token-id arrays of a wrapped LM: the inner model's logits (128 tokens
  # × 4,096 words a sample) bound the default batch, not the few ids.
  keras.utils.set_random_seed(0)
  backbone = keras_hub.models.Llama3Backbone(4096, **_GQA)
  model = keras_mas.MASModel.from_model(keras_hub.models.Llama3CausalLM(
      backbone=backbone, preprocessor=None))
  tokens = {"token_ids": np.zeros((4, 128), "int32"),
            "padding_mask": np.ones((4, 128), bool)}
  assert importance.default_batch_size(tokens) == 1024
  assert importance.default_batch_size(tokens, model) == 32
