"""Parameter importance: global MAS, local (Hebbian) MAS, Fisher, SI.

Each estimator returns one float32 tensor per entry of
`model.trainable_variables`, in that order and with the same shapes; see
`keras_mas.importance.estimators`. Exact per-sample gradients are formed
layer by layer in `keras_mas.importance.per_sample`.
"""

from keras_mas.importance.estimators import ESTIMATORS
from keras_mas.importance.estimators import default_batch_size
from keras_mas.importance.estimators import fisher
from keras_mas.importance.estimators import local_mas
from keras_mas.importance.estimators import mas
from keras_mas.importance.estimators import path_integral
from keras_mas.importance.estimators import squared_output_norm
from keras_mas.importance.estimators import uniform

__all__ = ["ESTIMATORS", "default_batch_size", "fisher", "local_mas", "mas",
           "path_integral", "squared_output_norm", "uniform"]
