"""Tests of the preset-driven example scripts.

One subprocess writes a tiny random preset with `save_to_preset` into a
temporary folder, then runs every script as `__main__` (with `runpy`, as
`python SCRIPT ARGS` would) against it, capturing each script's output and
exit code. Sharing one interpreter pays the import of TensorFlow, JAX or
PyTorch and the compilation of the tiny model once instead of per script.
The input checks are tested in this process through each script's
`parse_args`, which imports nothing heavy.
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPOSITORY = pathlib.Path(__file__).parents[2]
EXAMPLES_DIR = REPOSITORY / "examples"
TESTS_DIR = REPOSITORY / "tests"
TIMEOUT_SECONDS = 600
ARCHITECTURE_PRESET = "jetformer_350m_imagenet_256"
DIGIT_WORDS = set(
    "zero one two three four five six seven eight nine a handwritten".split()
)
CLASSES = ["zero", "one", "two"]

# Writes the tiny preset and three test images (two real digits as 28x28
# grayscale PNGs and a 40x60 RGB JPEG, which the scripts must convert to
# the model's 32x32x1), then runs the scripts and prints a JSON object of
# `{run name: {"exit_code", "stdout"}}` as its last line.
DRIVER = """
import contextlib
import io
import json
import runpy
import sys
import traceback

import numpy as np
from PIL import Image

from jetformer_preset_utils import save_tiny_preset
from keras_jetformer.data import load_digits

preset_dir, image_dir, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
save_tiny_preset(preset_dir)
digits, labels = load_digits("test", image_size=28)
for index in (0, 500):
    Image.fromarray(digits[index, :, :, 0]).save(
        f"{image_dir}/digit_{labels[index]}.png"
    )
rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype="uint8")
Image.fromarray(rgb).save(f"{image_dir}/photo.jpg")

results = {}
for name, script, args in runs:
    output = io.StringIO()
    sys.argv = [script, *args]
    exit_code = 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as error:
            exit_code = error.code
        except Exception:
            traceback.print_exc()
            exit_code = "exception"
    results[name] = {"exit_code": exit_code, "stdout": output.getvalue()}
sys.stdout.write("\\n" + json.dumps(results) + "\\n")
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("example_scripts")
    image_dir = root / "images"
    image_dir.mkdir()
    return {
        "root": root,
        "preset": str(root / "tiny_preset"),
        "image_dir": image_dir,
        "images": [
            str(image_dir / name)
            for name in ("digit_0.png", "digit_5.png", "photo.jpg")
        ],
        "grid": str(root / "grid.png"),
    }


def planned_runs(workspace):
    """`(run name, script path, arguments)` of every script run."""
    preset, images = workspace["preset"], workspace["images"]
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    generate_args = [
        "--prompt", "a handwritten seven",
        "--prompt", "a handwritten two",
        "--num-images", "3",
        "--guidance-scale", "2",
        "--temperature", "0.9",
        "--mixture-temperature", "0.5",
        "--seed", "1",
        "--scale", "2",
        "--backend", backend,
    ]
    return [
        (
            "generate",
            "generate_images.py",
            ["--preset", preset, *generate_args, "--out", workspace["grid"]],
        ),
        (
            "caption",
            "caption_images.py",
            [
                "--preset", preset, *images,
                "--max-length", "5",
                "--sampler", "top_k",
                "--top-k", "3",
                "--backend", backend,
            ],
        ),
        (
            "classify",
            "zero_shot_classify.py",
            [
                "--preset", preset, *images,
                "--classes", *CLASSES,
                "--template", "a handwritten {}",
                "--backend", backend,
            ],
        ),
        (
            "architecture_preset",
            "generate_images.py",
            [
                "--preset", ARCHITECTURE_PRESET,
                *generate_args,
                "--out", str(workspace["root"] / "architecture.png"),
            ],
        ),
        (
            "unknown_preset",
            "generate_images.py",
            [
                "--preset", "jetformer_no_such_preset",
                *generate_args,
                "--out", str(workspace["root"] / "unknown.png"),
            ],
        ),
    ]


@pytest.fixture(scope="module")
def script_runs(workspace):
    runs = [
        (name, str(EXAMPLES_DIR / script), args)
        for name, script, args in planned_runs(workspace)
    ]
    env = {
        **os.environ,
        # The driver imports the test utilities, and `zero_shot_classify.py`
        # imports `caption_images.py` from its own folder.
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS_DIR), str(EXAMPLES_DIR), os.environ.get("PYTHONPATH", "")]
        ),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [
            sys.executable, "-c", DRIVER,
            workspace["preset"], str(workspace["image_dir"]), json.dumps(runs),
        ],
        env=env,
        cwd=workspace["root"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def successful_output(script_runs, name):
    run = script_runs[name]
    assert run["exit_code"] in (0, None), run["stdout"][-5000:]
    return run["stdout"]


# --- The scripts, end to end --------------------------------------------------


def test_generate_images_writes_grid(script_runs, workspace):
    output = successful_output(script_runs, "generate")
    assert f"Wrote {workspace['grid']}" in output
    with Image.open(workspace["grid"]) as grid:
        # Two rows of three 32x32 images, each with a one-pixel border,
        # upscaled twice.
        assert grid.size == (3 * 34 * 2, 2 * 34 * 2)
        assert grid.mode == "L"
        pixels = np.asarray(grid)
    first_image = pixels[2:66, 2:66]
    second_image = pixels[2:66, 70:134]
    assert first_image.std() > 0
    assert not np.array_equal(first_image, second_image)


def test_caption_images_prints_caption_per_image(script_runs, workspace):
    output = successful_output(script_runs, "caption")
    captions = {}
    for line in output.splitlines():
        path, separator, caption = line.partition(": ")
        if separator and path in workspace["images"]:
            captions[path] = caption
    assert sorted(captions) == sorted(workspace["images"])
    for caption in captions.values():
        words = caption.split()
        # At most `--max-length` tokens, all from the tokenizer's words. A
        # random model may also end the caption at once.
        assert len(words) <= 5
        assert set(words) <= DIGIT_WORDS
    assert "Captioned 3 images" in output


def test_zero_shot_classify_prints_best_score(script_runs, workspace):
    lines = successful_output(script_runs, "classify").splitlines()
    for path in workspace["images"]:
        header = next(
            index
            for index, line in enumerate(lines)
            if line.startswith(f"{path}: ")
        )
        predicted = lines[header].split(": ")[1]
        scores = {}
        for line in lines[header + 1 : header + 1 + len(CLASSES)]:
            name, score = line.split()
            scores[name] = float(score)
        assert sorted(scores) == sorted(CLASSES)
        assert all(np.isfinite(score) and score < 0 for score in scores.values())
        assert predicted == max(scores, key=scores.get)


@pytest.mark.parametrize(
    "name, message",
    [
        ("architecture_preset", "No trained weights exist"),
        ("unknown_preset", "Built-in JetFormer presets: jetformer_1_3b"),
    ],
)
def test_scripts_explain_unloadable_presets(script_runs, name, message):
    run = script_runs[name]
    assert run["exit_code"] not in (0, None, "exception")
    assert message in str(run["exit_code"])
    assert "Traceback" not in run["stdout"]


# --- Input checks ----------------------------------------------------------------


def load_example(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    return importlib.import_module(name)


@pytest.mark.parametrize(
    "name", ["generate_images", "caption_images", "zero_shot_classify"]
)
def test_help_describes_options(name):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES_DIR)},
    )
    assert result.returncode == 0, result.stderr
    assert "--preset" in result.stdout
    assert "--backend" in result.stdout
    # Options with a value show their default.
    assert "(default:" in result.stdout


def assert_rejected(parse_args, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_images_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    parse_args = load_example("generate_images", monkeypatch).parse_args
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"")
    base = ["--preset", "p", "--prompt", "a seven"]
    cases = [
        ([*base, "--out", str(existing)], "Pass --overwrite"),
        ([*base, "--out", str(tmp_path / "g.jpg")], "must be a .png file"),
        ([*base, "--out", str(tmp_path / "missing" / "g.png")], "does not exist"),
        ([*base, "--out", "g.png", "--num-images", "0"], "--num-images must be"),
        ([*base, "--out", "g.png", "--guidance-scale", "-1"], "non-negative"),
        ([*base, "--out", "g.png", "--temperature", "0"], "must be positive"),
        (["--preset", "p", "--prompt", " ", "--out", "g.png"], "must not be empty"),
    ]
    for argv, message in cases:
        assert_rejected(parse_args, argv, message, capsys)
    args = parse_args([*base, "--out", str(existing), "--overwrite"])
    assert args.out == str(existing)


def test_caption_images_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    parse_args = load_example("caption_images", monkeypatch).parse_args
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), "uint8")).save(image)
    base = ["--preset", "p", str(image)]
    cases = [
        (["--preset", "p", str(tmp_path / "absent.png")], "not found"),
        ([*base, "--max-length", "0"], "--max-length must be"),
        ([*base, "--top-p", "1.5"], "--top-p must be"),
        ([*base, "--sampler", "beam"], "invalid choice"),
        ([*base, "--temperature", "0"], "must be positive"),
    ]
    for argv, message in cases:
        assert_rejected(parse_args, argv, message, capsys)


def test_zero_shot_classify_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    parse_args = load_example("zero_shot_classify", monkeypatch).parse_args
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), "uint8")).save(image)
    base = ["--preset", "p", str(image)]
    cases = [
        ([*base, "--classes", "zero"], "at least two"),
        ([*base, "--classes", "zero", "zero"], "must not repeat"),
        ([*base, "--classes", "zero", "one", "--template", "a digit"], "exactly once"),
        ([*base, "--classes", "zero", "one", "--batch-size", "0"], "--batch-size"),
    ]
    for argv, message in cases:
        assert_rejected(parse_args, argv, message, capsys)


def test_load_images_converts_size_and_channels(tmp_path, monkeypatch):
    load_images = load_example("caption_images", monkeypatch).load_images
    rgb = np.zeros((40, 60, 3), "uint8")
    rgb[:, 30:] = 255  # Right half white: the center crop keeps both halves.
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("not an image")

    gray = load_images([str(tmp_path / "photo.png")], (32, 32, 1))
    color = load_images([str(tmp_path / "photo.png")], (16, 16, 3))
    assert gray.shape == (1, 32, 32, 1)
    assert gray.dtype == np.uint8
    assert color.shape == (1, 16, 16, 3)
    assert gray[0, :, :4].max() == 0
    assert gray[0, :, -4:].min() == 255
    with pytest.raises(ValueError, match="not an image file"):
        load_images([str(tmp_path / "notes.png")], (32, 32, 1))
