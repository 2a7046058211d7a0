"""The Keras backend keras_mas runs on, fixed when Keras is imported.

TensorFlow (the default) runs `tf.function` train steps and `tf.distribute`;
JAX runs Keras's stateless trainer (`keras_mas.core._jax_trainer`); PyTorch
runs Keras's eager trainer, whose step is TensorFlow's with autograd in place
of the tape (`keras_mas.core.trainer`). TensorFlow stays installed on every
backend: data pipelines, TensorBoard and the task-free rehearsal buffer use
it, and the SavedModel export on TensorFlow and JAX (PyTorch exports
`torch.export` programs).
"""

import keras

__all__ = ["JAX", "NAME", "TENSORFLOW", "TORCH"]

NAME = keras.backend.backend()
TENSORFLOW = NAME == "tensorflow"
JAX = NAME == "jax"
TORCH = NAME == "torch"
