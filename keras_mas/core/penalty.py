"""The MAS penalty `λ Σ Ω (θ − θ*)²` inside the train step.

Its value (logged as `mas_penalty` and added to `loss`), its gradient
`2λΩ(θ − θ*)` in closed form (added to the task gradient, no second trip
through autodiff), and the proximal step that replaces the gradient in
`penalty_mode="proximal"`. `PenaltyTerm` is the penalty as one term of
`keras_mas.core.trainer`'s step. Written in `keras.ops`: TensorFlow traces it
into its train step, and JAX traces it inside a `keras.StatelessScope` mapping
each variable to the trainer state's value (`keras_mas.core._jax_trainer`).
PyTorch runs it eagerly after autograd, the penalty's passes as multi-tensor
`torch._foreach_*` calls.
"""

import keras
from keras import ops
from keras.src.backend import in_stateless_scope

from keras_mas import _backend

if _backend.TORCH:
  import torch  # pylint: disable=g-import-not-at-top

__all__ = ["PENALTY_MODES", "PenaltyTerm", "penalized_gradients",
           "proximal_step", "total"]

PENALTY_MODES = ("gradient", "proximal")


def total(terms):
  """The sum of scalar `terms` (0 for none), a float32 scalar."""
  if not terms:
    return ops.zeros((), "float32")
  result = terms[0]
  for term in terms[1:]:
    result = result + term
  return result


def penalized_gradients(values, importances, anchors, gradients, dtypes,
                        strength, coefficient, due=None):
  """`λ Σ Ω (θ − θ*)²` and each `g + c·Ω(θ − θ*)` whose `dtype` is given.

  `Ω(θ − θ*)` is formed once and serves both the value and the gradient,
  and the gradient is added to the task gradient where it is made: the work
  is element-wise and memory-bound (see benchmarks/RESULTS.md). PyTorch,
  eager, runs each operation as one multi-tensor (`torch._foreach_*`) call
  over all the variables rather than one call per variable; TensorFlow and
  JAX trace the same operations in `keras.ops`, and JAX's compiled step
  fuses them.

  Args:
    values: θ, float32 tensors.
    importances: Ω, one per value.
    anchors: θ*, one per value.
    gradients: the task gradient of each value, or None.
    dtypes: the dtype to add the penalty's gradient in, or None for a value
      whose gradient is not wanted (not trainable, or proximal mode).
    strength: λ, a float32 scalar tensor.
    coefficient: the factor of `Ω(θ − θ*)` in the gradient (2λ, scaled).
    due: a boolean scalar tensor; the value is computed only where it
      holds, 0 elsewhere. None: always.

  Returns:
    `(value, gradients)`: the penalty and the combined gradients (None
    where `dtype` is None).
  """
  if not values:
    return ops.zeros((), "float32"), []
  if _backend.TORCH:
    return _torch_penalized(values, importances, anchors, gradients, dtypes,
                            strength, coefficient, due)
  return _penalized(values, importances, anchors, gradients, dtypes,
                    strength, coefficient, due)


def _penalized(values, importances, anchors, gradients, dtypes, strength,
               coefficient, due):
  """`penalized_gradients` in `keras.ops`: TensorFlow's and JAX's."""
  pieces, combined = [], []
  for v, omega, anchor, g, dtype in zip(values, importances, anchors,
                                        gradients, dtypes):
    drift = v - anchor
    weighted = omega * drift
    pieces.append((weighted, drift))
    if dtype is None:
      combined.append(None)
    else:
      step = ops.cast(coefficient * weighted, dtype)
      combined.append(step if g is None else g + step)

  def value():
    # Not `ops.vdot`: TensorFlow's (a matrix product) measured slower on
    # CPUs than the product and its sum.
    return strength * total([ops.sum(w * d) for w, d in pieces])

  if due is None:
    return value(), combined
  return ops.cond(due, value, lambda: ops.zeros((), "float32")), combined


def _torch_penalized(values, importances, anchors, gradients, dtypes,
                     strength, coefficient, due):
  """PyTorch's: eager, so each call is a kernel (a parallel region on CPUs)
  and some Python. One multi-tensor call per operation over all the
  variables, and `g + c·Ω(θ − θ*)` as one addition scaled by `c`."""
  # pylint: disable=protected-access
  drifts = torch._foreach_sub(values, anchors)
  weighted = torch._foreach_mul(drifts, importances)
  combined = [None] * len(values)
  wanted = [i for i, dtype in enumerate(dtypes) if dtype is not None]
  if wanted:
    for i, step in zip(wanted, _torch_steps(
        [gradients[i] for i in wanted], [weighted[i] for i in wanted],
        [dtypes[i] for i in wanted], coefficient,
        host_scalar=coefficient.device.type == "cpu")):
      combined[i] = step
  if due is not None and not bool(due):
    return torch.zeros((), dtype=torch.float32,
                       device=values[0].device), combined
  dots = [torch.dot(w.reshape(-1), d.reshape(-1))
          for w, d in zip(weighted, drifts)]
  return strength * torch.stack(dots).sum(), combined


def _torch_steps(gradients, weighted, dtypes, coefficient, host_scalar):
  """Each `g + c·w` (`c·w` where `g` is None), in its dtype.

  `host_scalar`: read `c` on the host and fold it into the addition (free
  on CPUs; on an accelerator the read would wait for the device).
  """
  # pylint: disable=protected-access
  present = [k for k, g in enumerate(gradients) if g is not None]
  tasks = [gradients[k].to(torch.float32) for k in present]
  if host_scalar:
    alpha = float(coefficient)
    steps = [torch.mul(w, alpha) if g is None else None
             for g, w in zip(gradients, weighted)]
    sums = torch._foreach_add(tasks, [weighted[k] for k in present],
                              alpha=alpha) if present else []
  else:
    steps = list(torch._foreach_mul(weighted, coefficient))
    sums = torch._foreach_add(tasks, [steps[k] for k in present]) if (
        present) else []
  for k, s in zip(present, sums):
    steps[k] = s
  return [s.to(_torch_dtype(dtype)) for s, dtype in zip(steps, dtypes)]


def _torch_dtype(dtype):
  """A Keras dtype name (or a PyTorch dtype) as PyTorch's dtype."""
  if isinstance(dtype, torch.dtype):
    return dtype
  return getattr(torch, keras.backend.standardize_dtype(dtype))


def _eager_torch():
  return _backend.TORCH and not in_stateless_scope()


def _reads(variables):
  """The variables' tensors. Eager PyTorch takes each variable's own
  parameter: Keras's `.value` first checks the autocast and stateless
  scopes, a few µs a variable, and a step reads three (θ, Ω, θ*) for each
  parameter tensor."""
  if _eager_torch():
    return [v._value for v in variables]  # pylint: disable=protected-access
  return [v.value for v in variables]


def _dtypes(variables, slots):
  """The dtype of `variables[i]` for each `i` of `slots` (None: None), on
  eager PyTorch without Keras's `dtype` property (its autocast check)."""
  if _eager_torch():
    # pylint: disable-next=protected-access
    return [None if i is None else variables[i]._value.dtype for i in slots]
  return [None if i is None else variables[i].dtype for i in slots]


def _float32(tensor):
  if _backend.TORCH:
    return tensor if tensor.dtype == torch.float32 else tensor.float()
  return ops.cast(tensor, "float32")


def proximal_step(targets, importances, anchors, rate):
  """Moves each θ to the minimiser of its quadratic: `(θ + cθ*) / (1 + c)`.

  Args:
    targets: the variables θ.
    importances: Ω, variables, one per target.
    anchors: θ*, variables, one per target.
    rate: `2·η·λ`, so that `c = rate·Ω`.
  """
  for v, omega, anchor in zip(targets, importances, anchors):
    c = rate * omega.value
    v.assign(ops.cast((ops.cast(v, "float32") + c * anchor.value) / (1.0 + c),
                      v.dtype))


class PenaltyTerm:
  """The penalty as a term of the train step (see `keras_mas.core.trainer`).

  Args:
    state: the model's MAS state (targets, importances, anchors, strength).
    proximal: apply the penalty as a proximal step after the update instead
      of through the gradient.
    log_interval: compute the value every this many steps (and whenever the
      penalty tracker is empty); 1: every step.
    penalty_tracker: the `mas_penalty` metric, whose mean stands in on the
      steps that skip the value.
  """

  def __init__(self, state, proximal, log_interval, penalty_tracker):
    self.state = state
    self.proximal = proximal
    self.log_interval = log_interval
    self.penalty_tracker = penalty_tracker

  def before_update(self, step):
    """Adds `2λΩ(θ − θ*)` to `step.gradients`; sets `step.penalty`."""
    state = self.state
    strength = ops.cast(state.strength, "float32")
    # The penalty's gradient meets the task gradient where it stands: scaled
    # for loss scaling (mixed precision) and divided among replicas.
    coefficient = 2.0 * strength * ops.cast(step.gradient_scale, "float32")
    by_id = {id(v): i for i, v in enumerate(step.variables)}
    slots = [by_id.get(id(v)) for v in state.targets]
    due = None
    if self.log_interval > 1:
      due = ops.logical_or(
          ops.equal(self.penalty_tracker.count, 0),
          ops.equal(step.optimizer.iterations % self.log_interval, 0))
    # Variables no longer trainable (frozen since) count in the value only.
    penalty, combined = penalized_gradients(
        [_float32(t) for t in _reads(state.targets)],
        _reads(state.importances), _reads(state.anchors),
        [None if i is None else step.gradients[i] for i in slots],
        [None if i is None or self.proximal else dtype
         for i, dtype in zip(slots, _dtypes(step.variables, slots))],
        strength, coefficient, due)
    for i, g in zip(slots, combined):
      if g is not None:
        step.gradients[i] = g
    if due is None:
      self.penalty_tracker.update_state(penalty)
    else:
      self.penalty_tracker.update_state(
          penalty, sample_weight=ops.cast(due, "float32"))
      penalty = ops.where(due, penalty, self.penalty_tracker.result())
    step.penalty = penalty

  def after_update(self, step):
    """The proximal step, in proximal mode."""
    if self.proximal:
      state = self.state
      rate = ops.cast(step.optimizer.learning_rate, "float32") * 2.0 * ops.cast(
          state.strength, "float32")
      proximal_step(state.targets, state.importances, state.anchors, rate)
