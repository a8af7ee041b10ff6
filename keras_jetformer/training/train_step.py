"""Train and test steps that run a custom objective on every Keras backend.

Keras' default steps compute `y_pred = model(x)` and then a loss. JetFormer's
objective instead draws noise, runs parts of the model in between and needs
the optimizer's step count (for the noise curriculum) inside the compiled
step. `ObjectiveTrainer` provides those steps: a model that mixes it in
implements `compute_objective(x, step, training)` and
`update_objective_metrics(loss, metrics)`, and the per-backend code below
only does what Keras forces to differ: how gradients are taken and how
state flows through a compiled function.
"""

import itertools

import keras
from keras.src.trainers.data_adapters import data_adapter_utils


def _unpack_inputs(data):
    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
    return x


class ObjectiveTrainer:
    """Mixin for a `keras.Model` trained by `compute_objective`.

    Must come before the Keras model class in the bases so that its
    `train_step` and `test_step` take precedence.
    """

    def compute_objective(self, x, step, training):
        """Return `(loss, metrics)` for inputs `x` at optimizer step `step`.

        `step` is None in evaluation.
        """
        raise NotImplementedError

    def update_objective_metrics(self, loss, metrics):
        """Update the metric trackers and return the logs dict."""
        raise NotImplementedError

    def train_step(self, *args):
        backend = keras.config.backend()
        if backend == "jax":
            return _jax_train_step(self, *args)
        if backend == "tensorflow":
            return _tensorflow_train_step(self, *args)
        if backend == "torch":
            return _torch_train_step(self, *args)
        raise NotImplementedError(
            f"Training is not implemented for the {backend!r} backend."
        )

    def test_step(self, *args):
        if keras.config.backend() == "jax":
            return _jax_test_step(self, *args)
        x = _unpack_inputs(args[0])
        loss, metrics = self.compute_objective(x, step=None, training=False)
        return self.update_objective_metrics(loss, metrics)


# --- TensorFlow ---------------------------------------------------------------


def _tensorflow_train_step(model, data):
    import tensorflow as tf

    x = _unpack_inputs(data)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss, metrics = model.compute_objective(
            x, step=model.optimizer.iterations, training=True
        )
        scaled_loss = model.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, variables)
    model.optimizer.apply_gradients(zip(gradients, variables))
    return model.update_objective_metrics(loss, metrics)


# --- PyTorch --------------------------------------------------------------------


def _torch_train_step(model, data):
    import torch

    x = _unpack_inputs(data)
    model.zero_grad()
    loss, metrics = model.compute_objective(
        x, step=model.optimizer.iterations, training=True
    )
    model.optimizer.scale_loss(loss).backward()
    variables = model.trainable_variables
    gradients = [variable.value.grad for variable in variables]
    with torch.no_grad():
        model.optimizer.apply(gradients, variables)
    return model.update_objective_metrics(loss, metrics)


# --- JAX --------------------------------------------------------------------------
# JAX steps are pure functions of the state tuples that the Keras JAX trainer
# passes in; variables are read and written through `StatelessScope`s.


def _collect_updates(scope, variables, old_values):
    new_values = []
    for variable, old_value in zip(variables, old_values):
        value = scope.get_current_value(variable)
        new_values.append(old_value if value is None else value)
    return new_values


def _jax_objective(model, trainable_values, non_trainable_values, x, step, training):
    mapping = itertools.chain(
        zip(model.trainable_variables, trainable_values),
        zip(model.non_trainable_variables, non_trainable_values),
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        loss, metrics = model.compute_objective(x, step=step, training=training)
    non_trainable_values = _collect_updates(
        scope, model.non_trainable_variables, non_trainable_values
    )
    return loss, metrics, non_trainable_values


def _jax_update_metrics(model, metrics_values, loss, metrics):
    with keras.StatelessScope(
        state_mapping=zip(model.metrics_variables, metrics_values)
    ) as scope:
        logs = model.update_objective_metrics(loss, metrics)
    metrics_values = _collect_updates(
        scope, model.metrics_variables, metrics_values
    )
    return logs, metrics_values


def _iterations_index(optimizer):
    for index, variable in enumerate(optimizer.variables):
        if variable is optimizer.iterations:
            return index
    raise ValueError("The optimizer's `iterations` variable was not found.")


def _jax_train_step(model, state, data):
    import jax

    (
        trainable_values,
        non_trainable_values,
        optimizer_values,
        metrics_values,
    ) = state
    x = _unpack_inputs(data)
    step = optimizer_values[_iterations_index(model.optimizer)]

    def scaled_loss_fn(trainable_values):
        loss, metrics, new_non_trainable = _jax_objective(
            model, trainable_values, non_trainable_values, x, step, True
        )
        with keras.StatelessScope(
            state_mapping=zip(model.optimizer.variables, optimizer_values)
        ):
            scaled_loss = model.optimizer.scale_loss(loss)
        return scaled_loss, (loss, metrics, new_non_trainable)

    gradients, (loss, metrics, non_trainable_values) = jax.grad(
        scaled_loss_fn, has_aux=True
    )(trainable_values)
    trainable_values, optimizer_values = model.optimizer.stateless_apply(
        optimizer_values, gradients, trainable_values
    )
    logs, metrics_values = _jax_update_metrics(
        model, metrics_values, loss, metrics
    )
    state = (
        trainable_values,
        non_trainable_values,
        optimizer_values,
        metrics_values,
    )
    return logs, state


def _jax_test_step(model, state, data):
    trainable_values, non_trainable_values, metrics_values = state
    x = _unpack_inputs(data)
    loss, metrics, non_trainable_values = _jax_objective(
        model, trainable_values, non_trainable_values, x, None, False
    )
    logs, metrics_values = _jax_update_metrics(
        model, metrics_values, loss, metrics
    )
    return logs, (trainable_values, non_trainable_values, metrics_values)
