"""Training callbacks: the guard against a non-finite loss."""

import math

import keras

DEFAULT_CHECK_EVERY = 100


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stop training with an error when the loss becomes NaN or infinite.

    The JetFormer tasks add one to every `fit` that has none. The loss in
    the logs is the running mean over the epoch, so once one step's loss is
    NaN or infinite the mean stays so until the epoch ends. The guard
    therefore reads the loss only every `check_every` steps and at the end
    of each epoch, and still catches every bad step: it raises a
    `NonFiniteLossError` that names the range of optimizer steps in which
    the loss went bad. Reading a value forces a host sync on JAX, so
    checking every step would slow training down.

    Steps are counted from the optimizer's iteration count at the start of
    `fit`, so the range is right for resumed runs too.

    Args:
        check_every: int. Optimizer steps between two checks. Defaults to
            `100`.
    """

    def __init__(self, check_every=DEFAULT_CHECK_EVERY):
        super().__init__()
        if (
            isinstance(check_every, bool)
            or not isinstance(check_every, int)
            or check_every < 1
        ):
            raise ValueError(
                "`check_every` must be a positive integer. "
                f"Received: check_every={check_every!r}"
            )
        self.check_every = check_every

    def on_train_begin(self, logs=None):
        # Variables are in sync with the backend here, also on JAX.
        iterations = self.model.optimizer.iterations
        self._step = int(keras.ops.convert_to_numpy(iterations))
        self._last_checked_step = self._step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self._step
        self._last_checked_step = self._step

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the last batch of this call within the
        # epoch, also with `steps_per_execution > 1`.
        self._step = self._epoch_start_step + batch + 1
        if self._step - self._last_checked_step >= self.check_every:
            self._check(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs)

    def _check(self, logs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(keras.ops.convert_to_numpy(loss))
        if not math.isfinite(loss):
            self.model.stop_training = True
            # On JAX the variables live outside the model during `fit`; put
            # them back so the model stays usable after the error.
            if hasattr(self.model, "jax_state_sync"):
                self.model.jax_state_sync()
            raise NonFiniteLossError(
                f"The training loss became {loss} at an optimizer step "
                f"between {self._last_checked_step + 1} and {self._step} "
                f"(epoch {self._epoch + 1}). Lower the learning rate, check "
                "the training images for NaN or infinite pixels, or resume "
                "from the last checkpoint before that step."
            )
        self._last_checked_step = self._step
