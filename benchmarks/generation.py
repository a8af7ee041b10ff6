"""Benchmark image generation: cached vs uncached decoding, guidance cost.

    python benchmarks/generation.py [--backends jax tensorflow torch]

Each backend runs in its own process on two configs: bench-32 (32x32x3
images in 4x4 patches: 64 image tokens of 48 values, transformer width 256,
depth 4) and the same transformer over 64x64x3 images (256 image tokens).
For each it prints one machine-readable line per figure, for example
`jax tokens=256 cached/uncached speedup 7.3`:

- `seconds_per_image` and `tokens_per_s` of compiled cached decoding;
- `cached/uncached speedup`: uncached decoding runs the full forward pass
  over the whole fixed-length sequence for every new token;
- `last/first token time ratio`: per-token time of the last quarter of the
  tokens over that of the first quarter (1.0 is flat);
- `guided/unguided cost`: classifier-free guidance (two streams) over
  unguided decoding;
- `rejection/closed_form cost`: the reference's rejection sampler over the
  closed-form guided sampler (with guidance).

Times are medians of repeated runs after compilation, measured side by side
in one process, so ratios are comparable on a shared machine.
"""

import argparse
import os
import subprocess
import sys
import time

CONFIGS = {
    "bench-32": {"image_shape": (32, 32, 3), "num_mixtures": 64},
    "tokens-256": {"image_shape": (64, 64, 3), "num_mixtures": 64},
}
# The bench-32 transformer and flow. The flow decodes the image only once,
# after the last token.
BACKBONE_ARGUMENTS = {
    "patch_size": 4,
    "image_token_dim": 16,
    "vocabulary_size": 259,
    "num_layers": 4,
    "hidden_dim": 256,
    "intermediate_dim": 1024,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "flow_num_couplings": 8,
    "flow_hidden_dim": 128,
    "flow_num_layers": 2,
    "flow_num_heads": 4,
    "seed": 0,
}
BATCH_SIZE = 8
TEXT_LENGTH = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["jax", "tensorflow", "torch"],
        choices=["jax", "tensorflow", "torch"],
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed runs per measurement."
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def median_seconds(functions, repeats):
    """Return the median time of each function, timed in alternation.

    Alternating the runs exposes all functions to the same load, so their
    ratios stay meaningful on a shared machine.
    """
    import numpy as np
    from keras import ops

    for function in functions:
        ops.convert_to_numpy(function())  # Compile and warm up.
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, function_times in zip(functions, times):
            start = time.perf_counter()
            ops.convert_to_numpy(function())
            function_times.append(time.perf_counter() - start)
    return [float(np.median(function_times)) for function_times in times]


def compile_function(function):
    """Compile `function` of tensors for the current backend."""
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    import torch

    def no_grad(*args):
        with torch.no_grad():
            return function(*args)

    return no_grad


def run_worker(args):
    import keras
    import numpy as np
    from keras import ops

    from keras_jetformer.generation.image_generation import extend_image_cache
    from keras_jetformer.generation.image_generation import prefill_image_prompt
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerTextToImage

    backend = keras.config.backend()
    rng = np.random.default_rng(0)
    for name, config in CONFIGS.items():
        backbone = JetFormerBackbone(**BACKBONE_ARGUMENTS, **config)
        task = JetFormerTextToImage(backbone)
        transformer = backbone.transformer
        num_tokens = backbone.num_image_tokens
        token_ids = ops.convert_to_tensor(
            rng.integers(0, 256, (BATCH_SIZE, TEXT_LENGTH)).astype("int32")
        )
        padding_mask = ops.ones((BATCH_SIZE, TEXT_LENGTH), "bool")
        label = f"{backend} tokens={num_tokens}"

        def generate(guided, method="closed_form"):
            function = task.make_generate_function(guided, method)
            return lambda: function(
                token_ids,
                padding_mask,
                ops.convert_to_tensor(3.0),
                ops.convert_to_tensor(1.0),
                ops.convert_to_tensor(1.0),
            )

        unguided, guided, rejection = median_seconds(
            [generate(False), generate(True), generate(True, "rejection")],
            args.repeats,
        )
        print(f"{label} seconds_per_image {unguided / BATCH_SIZE:.4f}")
        print(f"{label} tokens_per_s {BATCH_SIZE * num_tokens / unguided:.1f}")
        print(f"{label} guided/unguided cost {guided / unguided:.2f}")
        print(f"{label} rejection/closed_form cost {rejection / guided:.2f}")

        # Teacher-forced decoding of fixed tokens isolates the transformer.
        image_tokens = ops.convert_to_tensor(
            rng.standard_normal(
                (BATCH_SIZE, num_tokens, backbone.image_token_dim)
            ).astype("float32")
        )

        def cached_steps(first, last):
            def run(token_ids, padding_mask, image_tokens):
                hidden, cache, key_mask, positions = prefill_image_prompt(
                    transformer, token_ids, padding_mask
                )
                prompt_length = hidden.shape[1]

                def step(index, carry):
                    cache, total = carry
                    hidden, cache = extend_image_cache(
                        transformer,
                        image_tokens[:, index - 1],
                        cache,
                        key_mask,
                        positions + index - 1,
                        prompt_length + index - 1,
                    )
                    return cache, total + ops.sum(hidden)

                _, total = ops.fori_loop(
                    first, last, step, (cache, ops.zeros(()))
                )
                return total

            return run

        def uncached_steps(token_ids, padding_mask, image_tokens):
            text_first = ops.ones((BATCH_SIZE,), "bool")
            slots = ops.arange(num_tokens)[None, :, None]

            def step(index, carry):
                written, total = carry
                # Every token reruns the whole fixed-length sequence, with
                # the tokens generated so far and zeros after them.
                embeddings, input_mask = transformer.embed_sequence(
                    token_ids, padding_mask, written, text_first
                )
                hidden = transformer.run_transformer(
                    embeddings,
                    transformer.causal_attention_mask(input_mask),
                    transformer.positions_from_mask(input_mask),
                )
                output = hidden[:, TEXT_LENGTH + index]
                # The next token depends on this step's output, as in real
                # decoding, so no step can be hoisted out of the loop.
                token = image_tokens[:, index] + 1e-6 * output[
                    :, : backbone.image_token_dim
                ]
                written = ops.where(slots == index, token[:, None], written)
                return written, total + ops.sum(output)

            written = ops.where(slots < 1, image_tokens, 0.0)
            _, total = ops.fori_loop(
                1, num_tokens, step, (written, ops.zeros(()))
            )
            return total

        inputs = (token_ids, padding_mask, image_tokens)
        cached = compile_function(cached_steps(1, num_tokens))
        uncached = compile_function(uncached_steps)
        cached_time, uncached_time = median_seconds(
            [lambda: cached(*inputs), lambda: uncached(*inputs)], args.repeats
        )
        print(f"{label} cached/uncached speedup {uncached_time / cached_time:.1f}")

        quarter = num_tokens // 4
        prefill = compile_function(cached_steps(1, 1))
        early = compile_function(cached_steps(1, 1 + quarter))
        late = compile_function(cached_steps(num_tokens - quarter, num_tokens))
        prefill_time, early_time, late_time = median_seconds(
            [
                lambda: prefill(*inputs),
                lambda: early(*inputs),
                lambda: late(*inputs),
            ],
            args.repeats,
        )
        ratio = (late_time - prefill_time) / max(early_time - prefill_time, 1e-9)
        print(f"{label} last/first token time ratio {ratio:.2f}")
        sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    failed = []
    for backend in args.backends:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--repeats",
            str(args.repeats),
        ]
        result = subprocess.run(
            command,
            env={**os.environ, "KERAS_BACKEND": backend},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sys.stdout.write(result.stdout)
        if result.returncode != 0:
            failed.append(backend)
            sys.stderr.write(result.stderr[-3000:])
    if failed:
        sys.exit(f"error: the benchmark failed on: {', '.join(failed)}")


if __name__ == "__main__":
    main()
