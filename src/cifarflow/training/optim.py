"""Optimizer pieces Keras lacks: per-variable learning rates, variables frozen after N steps,
and a lookahead-style EMA of the weights; a triangular (one-cycle) learning-rate schedule.

All of it runs inside the optimizer's update step with ``keras.ops`` (any backend), and
the extra state (the EMA) is optimizer state, so checkpoints and a resume (``DurableBackup``)
keep it. The techniques and their constants come from airbench94 (Jordan 2024,
arXiv 2404.00498; ``legacy/airbench94.py`` of KellerJordan/cifar10-airbench at
f1c599c, cited as L<n>); they are generic: any recipe can set them.
"""

from __future__ import annotations

import re

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cifarflow")
class Triangular(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-linear "triangular" (one-cycle) schedule, airbench94 L381-390.

    Step ``s`` (0-based, the optimizer's iteration count) gets
    ``peak * (start + (1 - start) * s / warmup)`` while ``s < warmup``, then falls
    linearly to ``end * peak`` at ``s = total_steps``:
    ``peak * (1 + (end - 1) * (s - warmup) / (total_steps - warmup))``.
    airbench94: ``warmup = int(0.23 * total_steps)``, ``start = 0.2``, ``end = 0.07``.

    Args:
        peak: learning rate at the top of the triangle.
        total_steps: steps of the whole run (> 0).
        warmup_steps: steps of the rising edge, ``0 <= warmup_steps < total_steps``.
        start: first learning rate as a fraction of ``peak``.
        end: last learning rate as a fraction of ``peak``.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, start: float = 0.2, end: float = 0.07):
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"triangular schedule needs 0 <= warmup_steps < total_steps, got {warmup_steps}, "
                             f"{total_steps}")
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        s = ops.cast(step, "float32")
        up = self.start + (1.0 - self.start) * s / max(self.warmup_steps, 1)
        down_frac = (s - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        down = 1.0 + (self.end - 1.0) * ops.minimum(down_frac, 1.0)
        return self.peak * ops.where(s < self.warmup_steps, up, down)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "start": self.start, "end": self.end}


def _first_match(path: str, rules: dict) -> object | None:
    for pattern, value in rules.items():
        if re.search(pattern, path):
            return value
    return None


def _read(variable):
    """The current value of a Keras variable (also inside the JAX backend's stateless step: JAX refuses
    ops on a Keras variable itself, ``__jax_array__``); anything else (a backend variable) as it is."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class VariableRulesMixin:
    """Adds three per-variable behaviours to a Keras optimizer (see :class:`SGD`).

    Args:
        lr_multipliers: ``{regex: factor}``; a variable whose path (e.g.
            ``fast/block1_bn1/beta``) matches gets ``factor`` times the learning
            rate in its update; decoupled weight decay still uses the base rate
            (airbench94's ``bias_scaler = 64`` on the BatchNorm biases, L45, L375-378).
        freeze_after: ``{regex: steps}``; a matching variable is updated (gradient
            step and weight decay) only during the first ``steps`` optimizer steps,
            then never again (airbench94 trains the whitening bias for 3 epochs, L47, L410).
        lookahead_steps: every this many steps (0: off), the weights are moved into an
            exponential moving average and reset to it: ``ema = d * ema + (1 - d) * w;
            w = ema`` with ``d = lookahead_decay * (s / lookahead_total_steps) ** 3`` at step
            ``s`` (1-based); at step ``lookahead_total_steps`` the weights become the
            EMA (airbench94's LookaheadState, L263-271, L392-393, L430-436: every 5
            steps, ``lookahead_decay = 0.95 ** 5``). Trainable variables only (airbench
            also averages the BatchNorm running statistics).
        lookahead_decay: the EMA decay at the last step.
        lookahead_total_steps: steps of the whole run.

    A first-match-wins rule per dict; the first match in dict order applies.
    """

    def __init__(self, *args, lr_multipliers: dict[str, float] | None = None,
                 freeze_after: dict[str, int] | None = None, lookahead_steps: int = 0,
                 lookahead_decay: float = 0.95**5, lookahead_total_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self.freeze_after = {k: int(v) for k, v in (freeze_after or {}).items()}
        self.lookahead_steps = int(lookahead_steps)
        self.lookahead_decay = float(lookahead_decay)
        self.lookahead_total_steps = int(lookahead_total_steps)
        if self.lookahead_steps and self.lookahead_total_steps < 1:
            raise ValueError("lookahead_steps needs lookahead_total_steps (the steps of the run)")

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._multiplier = [_first_match(v.path, self.lr_multipliers) for v in variables]
        self._frozen_after = [_first_match(v.path, self.freeze_after) for v in variables]
        self._lookahead = self.add_optimizer_variables(variables, "lookahead") if self.lookahead_steps else []

    def _use_weight_decay(self, variable):
        if self.freeze_after and self._frozen_after[self._get_variable_index(variable)] is not None:
            return False  # decayed in update_step, while the variable trains
        return super()._use_weight_decay(variable)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        multiplier = self._multiplier[index]
        until = self._frozen_after[index]
        old = ops.copy(_read(variable)) if until is not None or self.lookahead_steps else None
        if until is not None and self.weight_decay and super()._use_weight_decay(variable):
            lr = ops.cast(learning_rate, variable.dtype)
            value = _read(variable)
            self.assign(variable, value - value * ops.cast(self.weight_decay, variable.dtype) * lr)
        rate = learning_rate if multiplier is None else ops.multiply(learning_rate, multiplier)
        super().update_step(gradient, variable, rate)
        if until is not None:
            self.assign(variable, ops.where(ops.less(_read(self.iterations), until), _read(variable), old))
        if self.lookahead_steps:
            self._lookahead_step(variable, self._lookahead[index], old)

    def _lookahead_step(self, variable, ema, initial):
        iterations = _read(self.iterations)
        step = iterations + 1  # steps done, this one included (airbench's current_steps)
        ema_now = ops.where(ops.equal(iterations, 0), ops.cast(initial, ema.dtype), _read(ema))  # EMA starts at w_0
        frac = ops.cast(step, "float32") / float(self.lookahead_total_steps)
        decay = ops.cast(self.lookahead_decay * frac**3, ema.dtype)
        sync = ops.equal(step % self.lookahead_steps, 0)
        ema_new = ops.where(sync, decay * ema_now + (1 - decay) * ops.cast(_read(variable), ema.dtype), ema_now)
        self.assign(ema, ema_new)
        reset = ops.logical_or(sync, ops.equal(step, self.lookahead_total_steps))
        self.assign(variable, ops.where(reset, ops.cast(ema_new, variable.dtype), _read(variable)))

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": self.lr_multipliers, "freeze_after": self.freeze_after,
                "lookahead_steps": self.lookahead_steps, "lookahead_decay": self.lookahead_decay,
                "lookahead_total_steps": self.lookahead_total_steps}


@keras.saving.register_keras_serializable(package="cifarflow")
class SGD(VariableRulesMixin, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` plus :class:`VariableRulesMixin`'s per-variable rules and lookahead."""


@keras.saving.register_keras_serializable(package="cifarflow")
class Adam(VariableRulesMixin, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` plus :class:`VariableRulesMixin`'s per-variable rules and lookahead."""


@keras.saving.register_keras_serializable(package="cifarflow")
class AdamW(VariableRulesMixin, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` plus :class:`VariableRulesMixin`'s per-variable rules and lookahead."""


_RULE_KEYS = ("lr_multipliers", "freeze_after", "lookahead_steps", "lookahead_decay", "lookahead_total_steps")


def portable(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """``optimizer`` if it is a built-in Keras optimizer with a built-in (or no) schedule;
    else the built-in optimizer it extends, with the same settings and its current
    learning rate as a constant, without per-variable rules or lookahead.

    For what a logged model carries: a model compiled with it saves and loads with
    plain Keras (MLflow serving, export), where the classes of this module, or a
    :class:`Triangular` schedule, would need ``cifarflow`` imported to load. A
    ``LossScaleOptimizer`` (mixed_float16) gives its inner optimizer's.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return portable(inner)
    schedule = optimizer._learning_rate
    built_in = (type(optimizer).__module__.startswith("keras.")
                and (not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
                     or type(schedule).__module__.startswith("keras.")))
    if built_in:
        return optimizer
    base = next(c for c in type(optimizer).__mro__ if c.__module__.startswith("keras."))
    config = {k: v for k, v in optimizer.get_config().items() if k not in _RULE_KEYS}
    config["learning_rate"] = float(ops.convert_to_numpy(optimizer.learning_rate))
    return base.from_config(config)
