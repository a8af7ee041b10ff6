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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Build the optimizer under the `tf.distribute` strategy.

        Overrides a private hook of Keras' TensorFlow trainer (Keras 3.15),
        which builds a model under a strategy by averaging the first batch
        over the replicas. That average fails on boolean inputs such as
        `padding_mask`, and a built JetFormer task only needs its optimizer
        variables created in the strategy's scope.
        """
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or not self.built:
            return super()._maybe_symbolic_build(
                iterator=iterator, data_batch=data_batch
            )
        if self.optimizer is not None and not self.optimizer.built:
            with strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def test_step(self, *args):
        if keras.config.backend() == "jax":
            return _jax_test_step(self, *args)
        x = _unpack_inputs(args[0])
        loss, metrics = self.compute_objective(x, step=None, training=False)
        return self.update_objective_metrics(loss, metrics)


# --- TensorFlow ---------------------------------------------------------------


class _ReplicaSeedGenerator(keras.random.SeedGenerator):
    """Seeds of `seed_generator` folded with a `tf.distribute` replica id.

    Every replica advances the shared (mirrored) state of `seed_generator`
    in step, so without the fold all replicas would draw the same noise.
    Holds no state of its own.
    """

    def __init__(self, seed_generator, replica_id):
        # `SeedGenerator.__init__` would create a state variable.
        self.seed_generator = seed_generator
        self.replica_id = replica_id
        self.backend = seed_generator.backend
        self.name = seed_generator.name

    def next(self, ordered=True):
        import tensorflow as tf

        seed = self.seed_generator.next(ordered=ordered)
        folded = tf.random.experimental.stateless_fold_in(
            seed, tf.cast(self.replica_id, tf.int32)
        )
        return tf.cast(folded, seed.dtype)


def replica_seed_generator(seed_generator):
    """Return a seed generator that gives each data-parallel replica its own
    draws.

    Under a `tf.distribute` strategy with several replicas, each replica
    runs the train step on its share of the global batch with the same
    (mirrored) seed state, so the seeds are folded with the replica id.
    Elsewhere `seed_generator` is returned unchanged: on JAX one program
    draws the noise of the whole global batch, and sharding splits it.
    """
    if keras.config.backend() != "tensorflow":
        return seed_generator
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return seed_generator
    return _ReplicaSeedGenerator(
        seed_generator, context.replica_id_in_sync_group
    )


def _tensorflow_train_step(model, data):
    import tensorflow as tf

    x = _unpack_inputs(data)
    variables = model.trainable_variables
    # Each replica's loss is the mean over its share of the batch, and the
    # optimizer sums the replicas' gradients, so dividing by the number of
    # replicas averages over the global batch (exactly when the shares are
    # equal, as with `drop_remainder=True`).
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
        loss, metrics = model.compute_objective(
            x, step=model.optimizer.iterations, training=True
        )
        scaled_loss = model.optimizer.scale_loss(loss / num_replicas)
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
