"""RMSprop with the semantics of ``torch.optim.RMSprop`` (docs/reference.md §5)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="msdn_tf")
class TorchRMSprop(keras.optimizers.Optimizer):
    """RMSprop as PyTorch computes it, which is how the reference MSDN was trained.

    Per step, for every trainable variable ``w`` with gradient ``g``::

        g   <- g + weight_decay * w                 # coupled (L2) weight decay
        v   <- rho * v + (1 - rho) * g**2
        buf <- momentum * buf + g / (sqrt(v) + eps) # eps OUTSIDE the square root
        w   <- w - lr * buf                         # (without momentum: w - lr * g / (sqrt(v) + eps))

    Keras' own ``RMSprop`` differs: ``rho`` defaults to 0.9, ``epsilon`` sits inside
    the square root, and ``weight_decay`` is decoupled.

    Args:
        learning_rate: float, default 1e-4.
        rho: float, smoothing constant (torch ``alpha``), default 0.99.
        epsilon: float, added to ``sqrt(v)``, default 1e-8.
        momentum: float, default 0.9 (the reference uses 0.0 for AWA2).
        coupled_weight_decay: float, L2 term added to the gradient, default 1e-4.
        **kwargs: forwarded to ``keras.optimizers.Optimizer`` (``name``, ...).
            Keras' decoupled ``weight_decay`` is refused: use ``coupled_weight_decay``.

    Example:
        >>> opt = TorchRMSprop(learning_rate=1e-4, momentum=0.9)
        >>> w = keras.Variable([1.0, -2.0])
        >>> opt.apply([ops.convert_to_tensor([0.5, 0.5])], [w])

    Reference:
        PyTorch ``torch.optim.RMSprop`` (centered=False); the reference MSDN
        training scripts (lr 1e-4, alpha 0.99, eps 1e-8, momentum 0.9, weight decay 1e-4).
    """

    def __init__(
        self,
        learning_rate=1e-4,
        rho=0.99,
        epsilon=1e-8,
        momentum=0.9,
        coupled_weight_decay=1e-4,
        name="torch_rmsprop",
        **kwargs,
    ):
        if kwargs.get("weight_decay"):
            raise ValueError("TorchRMSprop applies coupled weight decay; pass coupled_weight_decay, not weight_decay")
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = float(rho)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(coupled_weight_decay)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._square_avg = [self.add_variable_from_reference(v, "square_avg") for v in var_list]
        self._momentum_buffer = (
            [self.add_variable_from_reference(v, "momentum_buffer") for v in var_list] if self.momentum > 0 else []
        )

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            g = g + self.coupled_weight_decay * variable
        index = self._get_variable_index(variable)
        square_avg = self._square_avg[index]
        self.assign(square_avg, self.rho * square_avg + (1.0 - self.rho) * ops.square(g))
        step = g / (ops.sqrt(square_avg) + self.epsilon)
        if self.momentum > 0:
            buf = self._momentum_buffer[index]
            self.assign(buf, self.momentum * buf + step)
            step = buf
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config.update(
            rho=self.rho,
            epsilon=self.epsilon,
            momentum=self.momentum,
            coupled_weight_decay=self.coupled_weight_decay,
        )
        return config
