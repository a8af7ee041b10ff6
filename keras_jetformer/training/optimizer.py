"""The reference optimizer setup, expressed with Keras optimizers."""

import keras


def jetformer_optimizer(
    total_steps=None,
    learning_rate=1e-3,
    warmup_fraction=0.1,
    weight_decay=1e-4,
    beta_2=0.95,
    global_clipnorm=1.0,
    use_ema=False,
    ema_momentum=0.9999,
):
    """Adam with linear warmup, cosine decay and decoupled weight decay.

    The reference update is `w -= schedule(t) * (lr * adam_direction + wd *
    w)`, where `schedule(t)` is the learning-rate schedule divided by its
    peak. Keras' `AdamW` multiplies its weight decay by the current learning
    rate, so `weight_decay` (in the reference's units) is divided by the
    peak `learning_rate` here. Which variables decay is chosen by
    `exclude_from_weight_decay`, see `JetFormerTextToImage.compile`.

    Args:
        total_steps: int. Length of the schedule. `None` keeps the learning
            rate constant.
        learning_rate: float. Peak learning rate. Defaults to `1e-3`.
        warmup_fraction: float. Share of `total_steps` with a linear warmup
            from zero. Defaults to `0.1`.
        weight_decay: float. Decoupled weight decay per step at the peak
            learning rate, as in the reference configs. Defaults to `1e-4`.
        beta_2: float. Adam's second-moment decay. Defaults to `0.95`.
        global_clipnorm: float. Clip gradients to this global norm. Defaults
            to `1.0`.
        use_ema: bool. Keep an exponential moving average of the weights.
            Defaults to `False`.
        ema_momentum: float. Defaults to `0.9999`.
    """
    if not learning_rate > 0:
        raise ValueError(
            "`learning_rate` must be positive. "
            f"Received: learning_rate={learning_rate}"
        )
    if not 0 <= warmup_fraction < 1:
        raise ValueError(
            "`warmup_fraction` must be in [0, 1). "
            f"Received: warmup_fraction={warmup_fraction}"
        )
    schedule = learning_rate
    if total_steps is not None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                "`total_steps` must be a positive integer or None. "
                f"Received: total_steps={total_steps!r}"
            )
        warmup_steps = int(round(warmup_fraction * total_steps))
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else learning_rate,
            decay_steps=max(total_steps - warmup_steps, 1),
            warmup_target=learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=weight_decay / learning_rate,
        beta_1=0.9,
        beta_2=beta_2,
        epsilon=1e-8,
        global_clipnorm=global_clipnorm,
        use_ema=use_ema,
        ema_momentum=ema_momentum,
    )


def exclude_from_weight_decay(optimizer, model):
    """Decay only kernels, as the reference does.

    Biases, normalization scales, embeddings and position embeddings are not
    decayed; frozen (non-trainable) variables never reach the optimizer.
    """
    decayed_names = ("kernel", "reverse_embeddings")
    excluded = [
        variable
        for variable in model.trainable_variables
        if variable.name not in decayed_names
    ]
    optimizer.exclude_from_weight_decay(var_list=excluded)
    return optimizer
