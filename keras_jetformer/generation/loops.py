"""A `fori_loop` whose body may use Keras variables on every backend."""

import keras
from keras import ops


def stateful_fori_loop(
    lower, upper, body, init, stateful_variables=(), read_only_variables=()
):
    """Run `body(i, carry)` for `i` in `[lower, upper)`, like `ops.fori_loop`.

    The body may read `read_only_variables` (e.g. model weights) and read
    and update `stateful_variables` (e.g. a seed generator's state). On
    TensorFlow and PyTorch variables work inside loops as they are. On JAX a
    loop body is traced separately, so the variables are carried through
    the loop (stateful ones) or mapped in from the enclosing trace
    (read-only ones) with a `keras.StatelessScope`, and the final values of
    the stateful ones are assigned back afterwards.
    """
    if keras.config.backend() != "jax":
        return ops.fori_loop(lower, upper, body, init)

    read_only_values = [variable.value for variable in read_only_variables]

    def stateless_body(i, carry):
        state_values, inner = carry
        mapping = list(zip(stateful_variables, state_values))
        mapping += list(zip(read_only_variables, read_only_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            inner = body(i, inner)
        new_values = []
        for variable, old_value in zip(stateful_variables, state_values):
            value = scope.get_current_value(variable)
            new_values.append(old_value if value is None else value)
        return new_values, inner

    state_values = [variable.value for variable in stateful_variables]
    state_values, outputs = ops.fori_loop(
        lower, upper, stateless_body, (state_values, init)
    )
    for variable, value in zip(stateful_variables, state_values):
        variable.assign(value)
    return outputs


def stateful_cond(pred, true_fn, false_fn, stateful_variables=()):
    """Run `true_fn()` or `false_fn()` like `ops.cond`, on every backend.

    Both branches may read and update `stateful_variables` (e.g. a seed
    generator's state). On JAX the branches are traced separately, so the
    variables' values are passed in and the chosen branch's updated values
    are returned and assigned, as in `stateful_fori_loop`.
    """
    if keras.config.backend() != "jax":
        return ops.cond(pred, true_fn, false_fn)

    def stateless(branch):
        def run(state_values):
            mapping = list(zip(stateful_variables, state_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                outputs = branch()
            new_values = []
            for variable, old_value in zip(stateful_variables, state_values):
                value = scope.get_current_value(variable)
                new_values.append(old_value if value is None else value)
            return new_values, outputs

        return run

    import jax

    state_values = [variable.value for variable in stateful_variables]
    state_values, outputs = jax.lax.cond(
        pred, stateless(true_fn), stateless(false_fn), state_values
    )
    for variable, value in zip(stateful_variables, state_values):
        variable.assign(value)
    return outputs
