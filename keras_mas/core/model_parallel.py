"""MAS on models larger than one device: Keras's `ModelParallel` on JAX.

Under a `keras.distribution.ModelParallel`, a `MASModel` creates Ω and θ*
with the layout of the variable each belongs to (`MASModel`'s state), so a
sharded weight has sharded MAS state and no replicated copy on every
device; the importance pass shards its inputs on the batch axis as `fit`
does (`keras_mas.importance`), and the penalty and its gradient run inside
the compiled, sharded train step. This module makes the distribution: a
device mesh, and the layout of each variable, from a KerasHub backbone's
own layout map (`Backbone.get_layout_map`) or, for any other model, a rule:

* a variable of rank 2 or more is split along the model axis on its last
  axis where that axis divides among the model axis's devices, otherwise
  on its first axis where that divides, otherwise replicated. A `Dense`
  kernel `(inputs, units)` is split by units (column-parallel), an
  embedding table `(vocabulary, width)` by width;
* vectors and scalars (biases, norms' scales, counters) are replicated.

Example (8 CPU devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`,
`KERAS_BACKEND=jax`):

```python
distribution = keras_mas.core.model_parallel.make_distribution((2, 4))
keras.distribution.set_distribution(distribution)
model = keras_mas.MASModel.from_model(build_my_model())  # weights sharded
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.consolidate(x_old)                                  # Ω, θ* sharded alike
model.fit(x_new, y_new)
```
"""

import re

import keras
import numpy as np

__all__ = ["RuleModelParallel", "check_batch_size", "check_layout_map",
           "data_parallel_size", "layout_map_of", "make_distribution",
           "per_device_bytes", "rule_axes"]


def rule_axes(shape, model_devices, model_axis="model"):
  """The rule's layout for a variable of `shape`: one mesh axis name (or
  None) per dimension."""
  axes = [None] * len(shape)
  if len(shape) >= 2 and model_devices > 1:
    for dim in (len(shape) - 1, 0):
      if shape[dim] % model_devices == 0:
        axes[dim] = model_axis
        break
  return tuple(axes)


class RuleModelParallel(keras.distribution.ModelParallel):
  """`ModelParallel` whose variables are laid out by the module's rule.

  Args:
    device_mesh: a `keras.distribution.DeviceMesh` of two axes, data then
      model (e.g. `("batch", "model")`).

  Raises:
    ValueError: for a mesh without two axes.
  """

  def __init__(self, device_mesh):
    if len(device_mesh.axis_names) != 2:
      raise ValueError(
          "Invalid value for argument `mesh`. Expected two axes, data then "
          f"model. Received: axis_names={list(device_mesh.axis_names)}")
    super().__init__(layout_map=keras.distribution.LayoutMap(device_mesh),
                     batch_dim_name=device_mesh.axis_names[0])
    self._model_axis = device_mesh.axis_names[1]
    self._model_devices = device_mesh.shape[1]

  def get_variable_layout(self, variable):
    if getattr(variable, "_layout", None) is not None:
      return variable._layout  # pylint: disable=protected-access
    return keras.distribution.TensorLayout(
        rule_axes(tuple(variable.shape), self._model_devices,
                  self._model_axis), self.device_mesh)


def make_distribution(mesh_shape, axis_names=("batch", "model"),
                      layout_map=None, devices=None):
  """A `ModelParallel` distribution over `devices` (all Keras sees).

  Args:
    mesh_shape: the device mesh's shape, `(data, model)`: e.g. `(8, 1)`
      (data parallel), `(2, 4)`, `(1, 8)` (model parallel).
    axis_names: the mesh axes' names, data axis first.
    layout_map: a `keras.distribution.LayoutMap` (e.g. a KerasHub
      backbone's `get_layout_map(mesh)`; see `layout_map_of`), or a callable
      `mesh -> LayoutMap`; None lays every variable out by the module's
      rule.
    devices: the devices to use; default `keras.distribution.list_devices()`
      (every process's, after `keras.distribution.initialize`).

  Returns:
    A `keras.distribution.ModelParallel`: set it with
    `keras.distribution.set_distribution` before the model's variables are
    made (building or loading it).

  Raises:
    ValueError: naming `mesh`, on a backend other than JAX, or for a mesh
      whose size is not the number of devices or whose axes do not match
      its shape.
  """
  backend = keras.backend.backend()
  if backend != "jax":
    raise ValueError(
        "Invalid value for argument `mesh`. Expected KERAS_BACKEND=jax: "
        "Keras's ModelParallel shards variables on JAX only. Received: "
        f"backend {backend!r}")
  devices = list(devices if devices is not None
                 else keras.distribution.list_devices())
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != len(axis_names) or len(shape) != 2:
    raise ValueError(
        "Invalid value for argument `mesh`. Expected two sizes, one per "
        f"axis of {list(axis_names)}. Received: mesh={list(mesh_shape)}")
  if int(np.prod(shape)) != len(devices) or min(shape) < 1:
    raise ValueError(
        "Invalid value for argument `mesh`. Expected sizes whose product is "
        f"the number of devices, {len(devices)}. Received: "
        f"mesh={list(shape)} ({int(np.prod(shape))} devices)")
  mesh = keras.distribution.DeviceMesh(shape, list(axis_names), devices)
  if layout_map is None:
    return RuleModelParallel(mesh)
  if callable(layout_map) and not isinstance(layout_map,
                                             keras.distribution.LayoutMap):
    layout_map = layout_map(mesh)
  return keras.distribution.ModelParallel(layout_map=layout_map,
                                          batch_dim_name=axis_names[0])


def layout_map_of(backbone_class, axis_names=("batch", "model")):
  """`mesh -> LayoutMap` from a KerasHub backbone class's own
  `get_layout_map`, or None where the class has none (then the rule)."""
  get = getattr(backbone_class, "get_layout_map", None)
  if get is None:
    return None

  def layout_map(mesh):
    try:
      return get(mesh, model_parallel_dim_name=axis_names[1],
                 data_parallel_dim_name=axis_names[0])
    except NotImplementedError:
      return None
  return layout_map


def data_parallel_size():
  """Devices on the data axis of the `keras.distribution` in effect (1
  without one): each training batch is split among them."""
  distribution = keras.distribution.distribution()
  if distribution is None:
    return 1
  mesh = distribution.device_mesh
  names = list(mesh.axis_names)
  axis = distribution.batch_dim_name
  return int(mesh.shape[names.index(axis)]) if axis in names else 1


def check_batch_size(batch_size):
  """Raises unless `batch_size` splits evenly among the data axis's devices.

  Keras's JAX trainer shards every training batch on the data axis, and a
  batch that does not divide there fails inside `fit`; for the same reason
  the runners cut each epoch's last batch to a multiple of the data axis
  (`pipelines.array_batches`'s `multiple_of`), leaving out fewer samples
  than the data axis has devices, drawn anew each epoch.

  Raises:
    ValueError: naming `batch_size`.
  """
  devices = data_parallel_size()
  if devices > 1 and batch_size % devices:
    raise ValueError(
        "Invalid value for argument `batch_size`. Expected a multiple of the "
        f"mesh's data axis, {devices} devices, which share each batch. "
        f"Received: batch_size={batch_size}")


def check_layout_map(layout_map, model):
  """Raises unless some key of `layout_map` names a variable of `model`.

  Raises:
    ValueError: naming `layout_map`, when no key matches a variable's path
      (a map written for another model would shard nothing).
  """
  keys = list(layout_map)
  paths = [v.path for v in model.variables]
  if keys and not any(re.fullmatch(k, p) for k in keys for p in paths):
    raise ValueError(
        "Invalid value for argument `layout_map`. Expected keys that match "
        f"variables of model {model.name!r} (paths such as {paths[:3]}). "
        f"Received: keys {keys[:5]}, which match none")


def per_device_bytes(model, device=None):
  """Bytes on `device` (default: the first) of the model's weights, its
  optimizer's state and its MAS state (Ω and θ*).

  Returns:
    A dict: `weights`, `optimizer`, `mas`.
  """
  def on_device(variables):
    total = 0
    for v in variables:
      value = v.value
      shards = getattr(value, "addressable_shards", None)
      if shards is None:
        total += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        continue
      for shard in shards:
        if device is None or shard.device == device:
          total += shard.data.nbytes
          break
    return total
  mas = getattr(model, "_mas", None)
  state = [] if mas is None else list(mas.importances) + list(mas.anchors)
  state_ids = {id(v) for v in state}
  optimizer = getattr(model, "optimizer", None)
  return {
      "weights": on_device([v for v in model.weights
                            if id(v) not in state_ids]),
      "optimizer": on_device(optimizer.variables if optimizer else []),
      "mas": on_device(state),
  }
