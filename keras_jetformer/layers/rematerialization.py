"""Rematerialization that lowers peak memory on every backend.

`keras.remat` on JAX is `jax.checkpoint`. It separates the recomputed
forward pass from the original one with optimization barriers. XLA's CPU
compiler (jaxlib 0.10.2) drops those barriers and merges the recomputation
back into the forward pass, so every activation stays alive and the
compiled step needs as much memory as without rematerialization. On JAX
this module instead recomputes the function inside a `jax.custom_vjp`
whose backward pass first adds `0 * cotangent` to the inputs. That data
dependency keeps XLA from merging the two passes and from scheduling the
recomputation before the cotangent arrives. TensorFlow and torch use
`keras.remat`.
"""

import keras


def _in_stateless_scope():
    # Imported here: the module is private to Keras, and only the JAX path
    # needs it.
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def _is_float(x):
    if x is None:
        return False
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype))


def rematerialized_call(layer, function, *args):
    """Call `function(*args)` and recompute its activations when differentiated.

    Args:
        layer: the `keras.layers.Layer` whose variables `function` reads.
            `function` must read no other variables and draw no random
            numbers, because the recomputation has to repeat the forward
            pass exactly.
        function: a function of tensors returning a tensor or a tuple of
            tensors.
        *args: tensors, or `None`.

    Returns:
        The output of `function(*args)`.
    """
    if keras.config.backend() == "jax" and _in_stateless_scope():
        # On JAX, gradients are taken only of stateless calls: `jax.grad`
        # of a function that maps variable values in a `StatelessScope`.
        return _jax_rematerialized_call(layer, function, args)

    # `tf.recompute_grad` differentiates every argument, so only the float
    # tensors are passed. `None`, masks and positions are put back inside.
    float_indices = [index for index, arg in enumerate(args) if _is_float(arg)]

    def call_with_floats(*float_args):
        full_args = list(args)
        for index, arg in zip(float_indices, float_args):
            full_args[index] = arg
        return function(*full_args)

    return keras.remat(call_with_floats)(*(args[i] for i in float_indices))


def _jax_rematerialized_call(layer, function, args):
    import jax
    import jax.numpy as jnp

    variables = list(layer.variables)
    # The values of the enclosing scope become explicit arguments, so that
    # `custom_vjp` returns their gradients (it cannot differentiate values
    # that a function closes over).
    values = [variable.value for variable in variables]

    def call_with_values(values, args):
        with keras.StatelessScope(state_mapping=zip(variables, values)):
            return function(*args)

    @jax.custom_vjp
    def call(values, args):
        return call_with_values(values, args)

    def call_forward(values, args):
        return call_with_values(values, args), (values, args)

    def call_backward(residuals, cotangents):
        values, args = residuals
        floats = [
            leaf
            for leaf in jax.tree_util.tree_leaves(cotangents)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        ]
        # NOTE: a NaN or infinite cotangent makes the recomputed inputs
        # NaN; their gradients would be non-finite anyway.
        dependency = jnp.zeros((), "float32")
        for leaf in floats:
            dependency = dependency + jnp.ravel(leaf)[0].astype("float32")
        dependency = dependency * 0.0

        def depend(x):
            if jnp.issubdtype(x.dtype, jnp.floating):
                return x + dependency.astype(x.dtype)
            return x

        values, args = jax.tree_util.tree_map(depend, (values, args))
        _, vjp = jax.vjp(call_with_values, values, args)
        return vjp(cotangents)

    call.defvjp(call_forward, call_backward)
    return call(values, args)
