"""Benchmark compiled training steps on jax, tensorflow and torch.

    python benchmarks/train_step.py [--config bench-32] [--steps 4]

Each backend trains the same model with `fit` in its own process, one after
the other in one run, with fixed seeds and random inputs. The default config
is bench-32: 32x32x3 images in 4x4 patches (64 image tokens of 48 values, 16
of them modelled), a flow of 8 couplings of 2 ViT blocks of width 128, and a
transformer of width 256, depth 4, MLP 1024, 4 query heads and 1 key/value
head of size 64. It has 64 mixtures, text length 16 and batch 32, and trains
with Adam (beta_2 0.95, gradient clipping at 1.0, learning rate 1e-3).
Torch runs twice, eagerly (`torch`) and with `torch.compile`
(`torch-compile`); tensorflow runs with XLA (`jit_compile=True`) and falls
back to a plain `tf.function` if XLA fails.

Per backend it prints the median step time after compilation, images/s,
the compile time (first step minus a median step), the peak resident memory
(RSS) of the process, the ratio of its step time to jax's and the model
FLOPs utilisation (MFU): model FLOPs per step / step time / float32 matmul
FLOP/s. The model FLOPs are counted analytically from the config (the
matmuls of the flow, the transformer and the heads, forward pass times 3
for a training step). The matmul throughput is measured right after every
step, as the best of 1024x1024 float32 matmuls with numpy and with the
backend, and the MFU is the median over steps of each step's ratio, which
keeps it steady when other processes load the machine unevenly. On an idle
machine the paired ratio flatters a backend whose process measures slower
matmuls (jax measured 135-147 GFLOP/s beside 170-207 in the other
processes of the same runs), so the summary also prints
`mfu_vs_best`: model FLOP/s over the best matmul throughput of the whole
run. One line per backend is machine-readable, e.g. `jax step_s 1.122
images_per_s 28.5 compile_s 13.8 peak_rss_mb 2961 mfu 67.6% matmul_gflops
145.6 mfu_vs_best 46.8% vs_jax 1.00`.

`--remat` also trains each backend of `--runs` with rematerialization on
and off at `--remat-batch-size` (64 by default) and prints, for each, the
step time, the peak RSS, the training memory (peak RSS during `fit` minus
the peak before it), the step memory (peak RSS of the steps after the
first, counted from the RSS left once freed memory is returned to the
system) and, on jax, the XLA temporary buffers of the compiled step, then
the memory saved and the step-time cost.

All processes share the machine with whatever else runs on it, so compare
numbers from one run.
"""

import argparse
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import time

# Backbone arguments per config. `batch_size` and `text_length` are the
# defaults of the run.
CONFIGS = {
    "bench-32": {
        "backbone": {
            "image_shape": (32, 32, 3),
            "patch_size": 4,
            "image_token_dim": 16,
            "vocabulary_size": 259,
            "num_layers": 4,
            "hidden_dim": 256,
            "intermediate_dim": 1024,
            "num_query_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_mixtures": 64,
            "flow_num_couplings": 8,
            "flow_hidden_dim": 128,
            "flow_num_layers": 2,
            "flow_num_heads": 4,
            "flow_coupling_kinds": ("channels",),
        },
        "batch_size": 32,
        "text_length": 16,
    },
    # The 350M shape at 256px with 16x16 patches (256 tokens of 768 values,
    # 128 modelled, 1024 mixtures), cut to 2 transformer blocks and 2
    # couplings so that a step fits a CPU run.
    "350m-shallow-256": {
        "backbone": {
            "image_shape": (256, 256, 3),
            "patch_size": 16,
            "image_token_dim": 128,
            "vocabulary_size": 259,
            "num_layers": 2,
            "hidden_dim": 1024,
            "intermediate_dim": 4096,
            "num_query_heads": 16,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_mixtures": 1024,
            "flow_num_couplings": 2,
            "flow_hidden_dim": 512,
            "flow_num_layers": 4,
            "flow_num_heads": 8,
            "flow_coupling_kinds": ("channels",),
        },
        "batch_size": 4,
        "text_length": 16,
    },
}
TRAINING_ARGUMENTS = {
    "text_prefix_prob": 0.5,
    "input_noise_std": 0.3,
    "noise_scale": 64.0,
    "noise_min": 3.0,
    "text_loss_weight": 0.0025,
    "seed": 0,
}
RUNS = ("jax", "tensorflow", "torch", "torch-compile")
# Runs that `--runs` accepts beyond the default ones.
EXTRA_RUNS = ("tensorflow-no-xla",)
MATMUL_SIZE = 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-32")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS + EXTRA_RUNS,
        default=list(RUNS),
        help="Backends to run; `torch-compile` is torch with torch.compile, "
        "`tensorflow-no-xla` is tensorflow with `jit_compile=False`.",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="Timed steps after the first (compiling) step.",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="Images per step. Defaults to the config's batch size.",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="Dtype policy of the backbone, e.g. mixed_bfloat16.",
    )
    parser.add_argument(
        "--remat",
        action="store_true",
        help="Also train each backend of --runs with rematerialization "
        "on and off and print the memory saved and the time it costs.",
    )
    parser.add_argument(
        "--remat-batch-size",
        type=int,
        default=64,
        help="Batch size of the rematerialization comparison.",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker-remat", choices=("on", "off"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1. Received: {args.steps}")
    if args.batch_size is None:
        args.batch_size = CONFIGS[args.config]["batch_size"]
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--remat-batch-size", args.remat_batch_size),
    ):
        if value < 1:
            parser.error(f"{option} must be at least 1. Received: {value}")
    return args


# --- Model FLOPs ----------------------------------------------------------


def training_flops_per_example(config, text_length):
    """Estimate the matmul FLOPs of one training step per example.

    Counts `2 * m * n * k` for every matmul of the forward pass (projections,
    attention scores and values over the full sequence as computed, MLPs,
    the mixture head and the text logits) and multiplies by 3 for the
    backward pass. Elementwise work (norms, activations, the mixture
    density) is left out.
    """
    height, width, channels = config["image_shape"]
    patch_size = config["patch_size"]
    num_tokens = (height // patch_size) * (width // patch_size)
    token_dim = patch_size * patch_size * channels

    # Flow: each coupling runs a ViT over N tokens of D / 2 values.
    flow_width = config["flow_hidden_dim"]
    flow_mlp = config.get("flow_intermediate_dim") or 4 * flow_width
    vit_block = (
        2 * num_tokens * flow_width * 3 * flow_width  # Query, key, value.
        + 2 * 2 * num_tokens * num_tokens * flow_width  # Scores, values.
        + 2 * num_tokens * flow_width * flow_width  # Output projection.
        + 2 * 2 * num_tokens * flow_width * flow_mlp  # MLP.
    )
    coupling = (
        2 * num_tokens * (token_dim // 2) * flow_width
        + config["flow_num_layers"] * vit_block
        + 2 * num_tokens * flow_width * token_dim
    )
    flow = config["flow_num_couplings"] * coupling

    # Transformer over [BOS, text, BOI, image] without its last element.
    model_width = config["hidden_dim"]
    length = text_length + num_tokens + 1
    query_dim = config["num_query_heads"] * config["head_dim"]
    key_value_dim = config["num_key_value_heads"] * config["head_dim"]
    block = (
        2 * length * model_width * (query_dim + 2 * key_value_dim)
        + 2 * 2 * length * length * query_dim
        + 2 * length * query_dim * model_width
        + 3 * 2 * length * model_width * config["intermediate_dim"]
    )
    transformer = (
        2 * num_tokens * config["image_token_dim"] * model_width
        + config["num_layers"] * block
    )

    # Heads: mixture parameters per image token, logits per text token.
    mixture_outputs = config["num_mixtures"] * (1 + 2 * config["image_token_dim"])
    heads = (
        2 * num_tokens * model_width * mixture_outputs
        + 2 * text_length * model_width * config["vocabulary_size"]
    )
    return 3 * (flow + transformer + heads)


# --- Measurements ---------------------------------------------------------


def peak_rss_mb():
    # `ru_maxrss` is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Return freed memory to the system, then restart the `VmHWM` peak.

    glibc keeps memory that the program freed (e.g. the compiler's) in the
    process, so without `malloc_trim` the restarted peak would still count
    it. Returns False where `/proc/self/clear_refs` cannot be written
    (outside Linux). The reset also restarts `ru_maxrss`, which Linux
    takes from the same counter.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mb():
    """Return `VmHWM` in MB, or None where `/proc/self/status` lacks it."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    # The value is in kB.
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def make_matmul_benchmark(size=MATMUL_SIZE):
    """Return `measure(repeats)`: the best float32 matmul FLOP/s right now.

    `measure` times `size`x`size` matmuls with numpy and with the backend's
    compiled matmul and returns the best throughput of either.
    """
    import keras
    import numpy as np
    from keras import ops

    backend = keras.config.backend()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype("float32")
    b = rng.standard_normal((size, size)).astype("float32")
    a_tensor, b_tensor = ops.convert_to_tensor(a), ops.convert_to_tensor(b)
    matmul = ops.matmul
    if backend == "jax":
        import jax

        matmul = jax.jit(ops.matmul)
    elif backend == "tensorflow":
        import tensorflow as tf

        matmul = tf.function(ops.matmul, jit_compile=True)
    candidates = [
        lambda: a @ b,
        lambda: ops.convert_to_numpy(matmul(a_tensor, b_tensor)),
    ]
    for candidate in candidates:
        candidate()  # Compile and warm up.

    def measure(repeats=2):
        best = math.inf
        for candidate in candidates:
            for _ in range(repeats):
                start = time.perf_counter()
                candidate()
                best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best

    return measure


def random_batch(config, batch_size, text_length, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch_size, *config["image_shape"]))
    return {
        "images": (pixels / 127.5 - 1.0).astype("float32"),
        "token_ids": rng.integers(0, 256, (batch_size, text_length)).astype(
            "int32"
        ),
        "padding_mask": np.ones((batch_size, text_length), "bool"),
    }


def build_task(config, dtype, remat, training_steps):
    import keras

    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerTextToImage

    keras.utils.set_random_seed(0)
    backbone = JetFormerBackbone(
        **config, seed=0, dtype=dtype, remat=remat
    )
    return JetFormerTextToImage(
        backbone, training_steps=training_steps, **TRAINING_ARGUMENTS
    )


class StepTimer:
    """Times every `fit` step, then the matmul throughput right after it.

    Measuring both in turn keeps their ratio (the MFU) steady when other
    processes load the machine unevenly over the run.
    """

    def __new__(cls, measure_matmul):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.step_times = []
                self.matmul_flops = []
                self.peak_reset = False
                self.first_step_peak_mb = None

            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                # Reading the loss waits for the step's computation.
                float(logs["loss"])
                self.step_times.append(time.perf_counter() - self.start)
                self.matmul_flops.append(measure_matmul())
                if batch == 0:
                    # The steps after this one run the compiled step only.
                    self.first_step_peak_mb = peak_rss_mb()
                    self.peak_reset = reset_peak_rss()

        return Timer()


def time_fit(task, batch, steps, measure_matmul):
    """Run `fit` for `steps + 1` steps.

    Returns `(step_times, matmul_flops, final_loss, peak_rss)`, with one
    entry per step in the first two. `peak_rss` maps `first_step_mb` to the
    process's peak RSS up to the end of the first step, which compiles, and
    `step_mb` to the peak over the steps after it (None where it cannot be
    measured).
    """
    import numpy as np

    data = {
        name: np.concatenate([value] * (steps + 1))
        for name, value in batch.items()
    }
    timer = StepTimer(measure_matmul)
    history = task.fit(
        data,
        batch_size=len(batch["images"]),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    peak_rss = {
        "first_step_mb": timer.first_step_peak_mb,
        "step_mb": peak_rss_since_reset_mb() if timer.peak_reset else None,
    }
    return (
        np.array(timer.step_times),
        np.array(timer.matmul_flops),
        history.history["loss"][-1],
        peak_rss,
    )


def compile_task(task, jit_compile):
    """Compile `task`; return the `jit_compile` value Keras settled on."""
    import keras

    optimizer = keras.optimizers.Adam(
        learning_rate=1e-3, beta_2=0.95, global_clipnorm=1.0
    )
    task.compile(optimizer=optimizer, jit_compile=jit_compile)
    return task.jit_compile


def xla_memory_mb(task, batch):
    """Sizes of the compiled jax train step's buffers, in MiB."""
    import jax

    task.optimizer.build(task.trainable_variables)
    state = (
        [v.value for v in task.trainable_variables],
        [v.value for v in task.non_trainable_variables],
        [v.value for v in task.optimizer.variables],
        [v.value for v in task.metrics_variables],
    )
    compiled = jax.jit(task.train_step).lower(state, (batch,)).compile()
    analysis = compiled.memory_analysis()
    return {
        "temp_mb": analysis.temp_size_in_bytes / 2**20,
        "argument_mb": analysis.argument_size_in_bytes / 2**20,
    }


def run_worker(args):
    import numpy as np

    config = CONFIGS[args.config]
    run = args.worker
    remat = args.worker_remat == "on"
    batch = random_batch(config["backbone"], args.batch_size, config["text_length"])
    step_flops = args.batch_size * training_flops_per_example(
        config["backbone"], config["text_length"]
    )
    measure_matmul = make_matmul_benchmark()
    result = {"run": run, "batch_size": args.batch_size}
    task = build_task(config["backbone"], args.dtype, remat, training_steps=1000)
    jit_compile = run not in ("torch", "tensorflow-no-xla")
    result["jit_compile"] = compile_task(task, jit_compile=jit_compile)
    rss_before_fit_mb = peak_rss_mb()
    try:
        step_times, matmul_flops, loss, peak_rss = time_fit(
            task, batch, args.steps, measure_matmul
        )
    except Exception as error:
        if not run.startswith("tensorflow") or not result["jit_compile"]:
            raise
        # XLA can reject an op; train with a plain `tf.function` instead.
        result["jit_compile_error"] = f"{type(error).__name__}: {error}"[:300]
        task = build_task(config["backbone"], args.dtype, remat, 1000)
        result["jit_compile"] = compile_task(task, jit_compile=False)
        step_times, matmul_flops, loss, peak_rss = time_fit(
            task, batch, args.steps, measure_matmul
        )
    # The reset after the first step also restarted `ru_maxrss`.
    process_peak_mb = max(peak_rss_mb(), peak_rss["first_step_mb"] or 0.0)
    # The first step compiles.
    step_s = float(np.median(step_times[1:]))
    mfu = np.median(step_flops / step_times[1:] / matmul_flops[1:])
    result.update(
        step_s=step_s,
        compile_s=float(step_times[0] - step_s),
        loss=float(loss),
        peak_rss_mb=process_peak_mb,
        train_rss_mb=process_peak_mb - rss_before_fit_mb,
        step_rss_mb=peak_rss["step_mb"],
        matmul_flops=float(np.median(matmul_flops[1:])),
        best_matmul_flops=float(np.max(matmul_flops)),
        flops_per_s=float(step_flops / step_s),
        mfu=float(mfu),
    )
    if args.worker_remat is not None and run == "jax":
        result.update(xla_memory_mb(task, batch))
    print("RESULT " + json.dumps(result), flush=True)


# --- Driver ---------------------------------------------------------------


def run_in_subprocess(args, run, batch_size, remat=None):
    """Run one worker; return its result dict, or None if it failed."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        run,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(batch_size),
        "--dtype",
        args.dtype,
    ]
    if remat is not None:
        command += ["--worker-remat", remat]
    backend = run.split("-")[0]
    result = subprocess.run(
        command,
        env={**os.environ, "KERAS_BACKEND": backend},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(f"{run} failed:\n{result.stderr[-3000:]}\n")
    return None


def format_result(run, result, jax_step_s, best_matmul_flops=None):
    step_s = result["step_s"]
    line = (
        f"{run} step_s {step_s:.3f} images_per_s "
        f"{result['batch_size'] / step_s:.1f} compile_s "
        f"{result['compile_s']:.1f} peak_rss_mb "
        f"{result['peak_rss_mb']:.0f} mfu {100 * result['mfu']:.1f}% "
        f"matmul_gflops {result['matmul_flops'] / 1e9:.1f}"
    )
    if best_matmul_flops:
        mfu_vs_best = result["flops_per_s"] / best_matmul_flops
        line += f" mfu_vs_best {100 * mfu_vs_best:.1f}%"
    if jax_step_s:
        line += f" vs_jax {step_s / jax_step_s:.2f}"
    if run.startswith("tensorflow"):
        line += f" jit_compile {result['jit_compile']}"
    return line


def percent_saved(on, off):
    return f"{100 * (1 - on / off):.1f}%" if off > 0 else "n/a"


def compare_remat(args, run):
    """Train `run` with rematerialization off and on and print the savings.

    Returns False if either training run failed.
    """
    off = run_in_subprocess(args, run, args.remat_batch_size, "off")
    on = run_in_subprocess(args, run, args.remat_batch_size, "on")
    if off is None or on is None:
        return False
    for name, result in (("off", off), ("on", on)):
        line = (
            f"{run} remat {name} batch {args.remat_batch_size} step_s "
            f"{result['step_s']:.3f} peak_rss_mb {result['peak_rss_mb']:.0f} "
            f"train_rss_mb {result['train_rss_mb']:.0f}"
        )
        if result.get("step_rss_mb") is not None:
            line += f" step_rss_mb {result['step_rss_mb']:.0f}"
        if "temp_mb" in result:
            line += f" xla_temp_mb {result['temp_mb']:.0f}"
        print(line)
    line = (
        f"{run} remat memory_saved_rss "
        f"{percent_saved(on['peak_rss_mb'], off['peak_rss_mb'])} "
        "memory_saved_train_rss "
        f"{percent_saved(on['train_rss_mb'], off['train_rss_mb'])}"
    )
    if on.get("step_rss_mb") is not None and off.get("step_rss_mb") is not None:
        line += (
            " memory_saved_step_rss "
            f"{percent_saved(on['step_rss_mb'], off['step_rss_mb'])}"
        )
    if "temp_mb" in on:
        line += (
            " memory_saved_xla_temp "
            f"{percent_saved(on['temp_mb'], off['temp_mb'])}"
        )
    line += f" time_cost {100 * (on['step_s'] / off['step_s'] - 1):.1f}%"
    print(line, flush=True)
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)

    config = CONFIGS[args.config]
    step_flops = args.batch_size * training_flops_per_example(
        config["backbone"], config["text_length"]
    )
    print(
        f"config {args.config}, batch {args.batch_size}, dtype {args.dtype}, "
        f"{args.steps} timed steps; model FLOPs per training step "
        f"{step_flops / 1e9:.1f} G (analytic estimate)",
        flush=True,
    )

    # Progress lines start with "#"; the summary below repeats them with
    # the ratio to jax.
    results = {}
    for run in args.runs:
        result = run_in_subprocess(args, run, args.batch_size)
        if result is not None:
            results[run] = result
            print("# " + format_result(run, result, None), flush=True)

    jax_step_s = results["jax"]["step_s"] if "jax" in results else None
    best_matmul_flops = max(
        (result["best_matmul_flops"] for result in results.values()),
        default=None,
    )
    if best_matmul_flops:
        print(
            "best matmul_gflops of the run "
            f"{best_matmul_flops / 1e9:.1f} (mfu_vs_best divides by it)"
        )
    for run, result in results.items():
        print(format_result(run, result, jax_step_s, best_matmul_flops))
        if "jit_compile_error" in result:
            print(f"  XLA failed: {result['jit_compile_error']}")
    sys.stdout.flush()

    failed_remat = []
    if args.remat:
        for run in args.runs:
            if not compare_remat(args, run):
                failed_remat.append(f"{run} remat")
    missing = [run for run in args.runs if run not in results]
    missing += failed_remat
    if missing:
        sys.exit(f"error: the benchmark failed on: {', '.join(missing)}")


if __name__ == "__main__":
    main()
