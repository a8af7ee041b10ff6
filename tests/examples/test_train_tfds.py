"""End-to-end runs of `examples/train_tfds.py` on `tfds.testing.mock_data`.

One subprocess runs the script's `main` several times with a tiny model,
on the backend of this test session. The runs are a class-conditional
cifar10 run with checkpoints, its refusal to overwrite them, a resumed run,
and an image-text coco_captions run with data parallelism where the
backend has it. The argument checks run in this process through
`parse_args`.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

REPOSITORY = pathlib.Path(__file__).parents[2]
SCRIPT = REPOSITORY / "examples" / "train_tfds.py"
TIMEOUT_SECONDS = 900
COMMON = [
    "--size=tiny",
    "--mock-examples=16",
    "--batch-size=4",
    "--checkpoint-every=2",
    "--sample-every=4",
    "--num-samples=4",
    "--log-every=1",
]

# Runs `main` for each argument list and prints `{name: exit code}` as JSON
# on the last line. A `SystemExit` (the refusal) is caught and recorded.
DRIVER = """
import json
import runpy
import sys

runs = json.loads(sys.argv[1])
module = runpy.run_path(sys.argv[2])
codes = {}
for name, argv in runs.items():
    try:
        module["main"](argv)
        codes[name] = 0
    except SystemExit as error:
        codes[name] = str(error.code)
    print(f"=== finished {name}", flush=True)
print(json.dumps(codes))
"""


def import_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_tfds
    finally:
        sys.path.pop(0)
    return train_tfds


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    backend = keras.config.backend()
    cifar_dir = tmp_path_factory.mktemp("cifar10")
    coco_dir = tmp_path_factory.mktemp("coco_captions")
    distribution = "none" if backend == "torch" else "data"
    runs = {
        "train": [
            "--dataset=cifar10",
            "--steps=4",
            f"--output-dir={cifar_dir}",
            *COMMON,
        ],
        "refuse": [
            "--dataset=cifar10",
            "--steps=4",
            f"--output-dir={cifar_dir}",
            *COMMON,
        ],
        "resume": [
            "--dataset=cifar10",
            "--steps=6",
            "--resume",
            f"--output-dir={cifar_dir}",
            *COMMON,
        ],
        "image_text": [
            "--dataset=coco_captions",
            "--steps=2",
            f"--distribution={distribution}",
            f"--output-dir={coco_dir}",
            *COMMON,
        ],
    }
    for argv in runs.values():
        argv.append(f"--backend={backend}")
    completed = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(runs), str(SCRIPT)],
        env={**os.environ, "KERAS_BACKEND": backend},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    return {
        "codes": json.loads(lines[-1]),
        "stdout": completed.stdout,
        "cifar_dir": cifar_dir,
        "coco_dir": coco_dir,
    }


def test_class_conditional_run_writes_outputs(runs):
    assert runs["codes"]["train"] == 0
    cifar_dir = runs["cifar_dir"]
    assert (cifar_dir / "checkpoints" / "step_2.keras").exists()
    assert (cifar_dir / "samples" / "step_4.png").exists()
    assert (cifar_dir / "model.keras").exists()
    assert list((cifar_dir / "logs" / "train").glob("events.out.tfevents.*"))
    assert list((cifar_dir / "logs" / "samples").glob("events.out.tfevents.*"))


def test_existing_checkpoints_need_resume(runs):
    assert "Pass --resume" in runs["codes"]["refuse"]


def test_resume_continues_from_latest_checkpoint(runs):
    assert runs["codes"]["resume"] == 0
    assert "at optimizer step 4" in runs["stdout"]
    checkpoints = sorted(
        path.name for path in (runs["cifar_dir"] / "checkpoints").iterdir()
    )
    # The default keeps the 3 most recent.
    assert checkpoints == ["step_2.keras", "step_4.keras", "step_6.keras"]
    assert (runs["cifar_dir"] / "samples" / "step_6.png").exists()


def test_image_text_run(runs):
    assert runs["codes"]["image_text"] == 0
    coco_dir = runs["coco_dir"]
    assert (coco_dir / "checkpoints" / "step_2.keras").exists()
    assert (coco_dir / "samples" / "step_2.png").exists()


def test_tensorboard_logs_every_metric(runs):
    from tensorboard.backend.event_processing import event_accumulator

    directory = runs["cifar_dir"] / "logs" / "train"
    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        accumulator = event_accumulator.EventAccumulator(str(path))
        accumulator.Reload()
        tags.update(accumulator.Tags()["tensors"])
        tags.update(accumulator.Tags()["scalars"])
    for metric in ("loss", "nll_image", "logdet", "noise_scale"):
        assert any(metric in tag for tag in tags), (metric, tags)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset=mnist"], "--dataset must be one of"),
        (["--dataset=cifar10", "--steps=0"], "--steps must be at least 1"),
        (["--dataset=cifar10", "--mesh=2,4"], "--mesh needs --distribution"),
        (
            ["--dataset=cifar10", "--distribution=model", "--mesh=2x4"],
            "--mesh must be two positive integers",
        ),
        (
            [
                "--dataset=cifar10",
                "--distribution=model",
                "--backend=tensorflow",
            ],
            "--distribution model needs --backend jax",
        ),
        (
            ["--dataset=cifar10", "--distribution=data", "--backend=torch"],
            "the Keras torch backend trains on one device",
        ),
    ],
)
def test_parse_args_rejects(argv, message, capsys):
    train_tfds = import_script()
    with pytest.raises(SystemExit):
        train_tfds.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_describes_a_real_run(capsys):
    train_tfds = import_script()
    with pytest.raises(SystemExit):
        train_tfds.parse_args(["--help"])
    text = capsys.readouterr().out
    for fragment in ("tfds build", "SentencePiece", "--distribution model"):
        assert fragment in text
