"""Argument checks and report lines of `benchmarks/train_step.py`.

The timed runs themselves are not tested: speed is measured by running the
script, never in tests.
"""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be at least 1. Received: 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1. Received: 0"),
        (
            ["--remat-batch-size", "-2"],
            "--remat-batch-size must be at least 1. Received: -2",
        ),
        (["--runs", "mxnet"], "invalid choice: 'mxnet'"),
        (["--config", "bench-1024"], "invalid choice: 'bench-1024'"),
    ],
)
def test_benchmark_rejects_bad_arguments(benchmark, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        benchmark.parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_defaults(benchmark):
    args = benchmark.parse_args([])
    assert args.config == "bench-32"
    assert args.batch_size == 32
    assert args.remat_batch_size == 64
    assert args.runs == ["jax", "tensorflow", "torch", "torch-compile"]


def test_benchmark_flops_of_bench_32(benchmark):
    config = benchmark.CONFIGS["bench-32"]
    flops = 32 * benchmark.training_flops_per_example(
        config["backbone"], config["text_length"]
    )
    # XLA's cost analysis of the compiled jax step counted 113.9 GFLOP,
    # which adds the elementwise work the estimate leaves out.
    assert flops == pytest.approx(111.4e9, rel=1e-3)


def test_benchmark_result_line(benchmark):
    result = {
        "step_s": 2.0,
        "batch_size": 32,
        "compile_s": 10.0,
        "peak_rss_mb": 3000.0,
        "mfu": 0.5,
        "matmul_flops": 100e9,
        "flops_per_s": 50e9,
        "jit_compile": True,
    }
    line = benchmark.format_result("tensorflow", result, 1.0, 200e9)
    assert line.startswith("tensorflow step_s 2.000 images_per_s 16.0 ")
    assert "mfu 50.0%" in line
    assert "mfu_vs_best 25.0%" in line
    assert "vs_jax 2.00" in line
    assert line.endswith("jit_compile True")


def test_benchmark_percent_saved(benchmark):
    assert benchmark.percent_saved(60.0, 100.0) == "40.0%"
    assert benchmark.percent_saved(120.0, 100.0) == "-20.0%"
    assert benchmark.percent_saved(1.0, 0.0) == "n/a"


@pytest.mark.skipif(
    not pathlib.Path("/proc/self/clear_refs").exists(),
    reason="Resetting the peak RSS needs Linux's /proc/self/clear_refs.",
)
def test_benchmark_peak_rss_reset(benchmark):
    import numpy as np

    # 400 MB written page by page, then freed.
    block = np.ones(50_000_000)
    del block
    peak_before_mb = benchmark.peak_rss_since_reset_mb()
    assert benchmark.reset_peak_rss()
    peak_after_reset_mb = benchmark.peak_rss_since_reset_mb()
    assert peak_after_reset_mb < peak_before_mb - 300

    # A new 200 MB block raises the restarted peak again.
    block = np.ones(25_000_000)
    assert benchmark.peak_rss_since_reset_mb() > peak_after_reset_mb + 150
    del block
