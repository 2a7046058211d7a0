"""The method: `MASModel`, its penalty and state, the regularizer.

Everything a user's own `model.fit` needs: `models` (`MASModel`),
`regularizers` (`MASRegularizer`, `attach`), `path_integral` (Synaptic
Intelligence's path), `callbacks` (the divergence guard and TensorBoard
logging), `heads` (losses and metrics of one task's outputs),
`batch_statistics` (BatchNormalization statistics across tasks),
`multi_worker` (tf.distribute fixes) and `model_parallel` (Keras's
`ModelParallel` on JAX: a device mesh, variables' layouts).
"""

from keras_mas import _lazy

_MODULES, __getattr__, _dir = _lazy.submodules(__name__, __path__)
__all__ = list(_MODULES)


def __dir__():
  return _dir(globals())
