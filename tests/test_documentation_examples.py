"""Run every Python example in README.md and in the package's docstrings.

README.md: every ```python block runs; blocks that must not run are marked
```shell or ```text. The blocks of one `## ` section (with its `### `
subsections) run in order in one namespace, as a reader would paste them,
inside a temporary working directory that contains the fixture files of
`write_readme_fixtures`. Each section starts from a fresh namespace.

Docstrings: every ```python block and every `>>>` example in the docstrings
of the public modules, classes, functions and methods of `keras_jetformer`
runs in a fresh copy of `docstring_context`, which defines the names that
docstring examples use without defining (`backbone`, `tokenizer`,
`preprocessor`, `images`, ...). `>>>` examples are checked against their
expected output as doctest does.

Everything runs against a tiny random preset, so the examples need no
trained weights and build small models. Before running, the source text is
changed only by the substitutions in `SUBSTITUTIONS`: preset names become
the tiny preset's folder, model sizes become the tiny sizes, and training
runs become 2 steps of 1 epoch. TFDS datasets are served by
`tfds.testing.mock_data`, so nothing downloads. Examples that build a
device mesh run in a JAX subprocess with 2 virtual CPU devices.
"""

import contextlib
import doctest
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from jetformer_preset_utils import TINY_PRESET_BACKBONE_CONFIG
from jetformer_preset_utils import save_tiny_preset
from PIL import Image

import keras_jetformer
from keras_jetformer.models.jetformer_presets import ARCHITECTURE_PRESETS
from keras_jetformer.models.jetformer_presets import TINY_MNIST_PRESET

REPOSITORY = pathlib.Path(__file__).parents[1]
README = REPOSITORY / "README.md"

# Preset names that examples load; each is replaced by the tiny preset's
# folder. The architecture presets would build models of a billion
# parameters or more.
PRESET_NAMES = (TINY_MNIST_PRESET, *ARCHITECTURE_PRESETS)

# Backbone size arguments, written as `name=<integer>` in examples, are
# replaced by the sizes of the tiny preset.
SIZE_ARGUMENTS = (
    "num_layers",
    "hidden_dim",
    "intermediate_dim",
    "num_query_heads",
    "head_dim",
    "num_mixtures",
    "flow_num_couplings",
    "flow_hidden_dim",
    "flow_num_layers",
    "flow_num_heads",
)

# `(pattern, replacement, reason)`, applied in order with `re.sub`. The
# preset names are replaced in `substitute`, which receives the preset folder.
SUBSTITUTIONS = [
    *[
        (
            rf"\b{name}=\d[\d_]*",
            f"{name}={TINY_PRESET_BACKBONE_CONFIG[name]}",
            "tiny model sizes",
        )
        for name in SIZE_ARGUMENTS
    ],
    (r"\bepochs=\d[\d_]*", "epochs=1", "one epoch"),
    (r"\bsteps_per_epoch=\d[\d_]*", "steps_per_epoch=2", "two training steps"),
]

# Examples that need several devices, found by this string in their source,
# run in a JAX subprocess with 2 virtual CPU devices (`MESH_PRELUDE` defines
# the names that docstring examples use there), and are skipped on the
# other backends.
MULTI_DEVICE_MARKER = "keras.distribution.DeviceMesh"
MESH_PRELUDE = """
import keras
import numpy as np
import keras_jetformer
from keras_jetformer.layers import *
from keras_jetformer.models import *
"""
MESH_TIMEOUT_SECONDS = 600

# The images of the README's folder example, as (file name, (width, height),
# Pillow mode), with two captions each in `my_images/captions.csv`.
FOLDER_IMAGES = (
    ("cat_1.jpg", (40, 32), "RGB"),
    ("cat_2.png", (32, 32), "L"),
    ("dogs/rex.png", (32, 48), "RGBA"),
)


def substitute(source, preset_dir):
    """Apply `SUBSTITUTIONS` and replace preset names by `preset_dir`."""
    for pattern, replacement, _ in SUBSTITUTIONS:
        source = re.sub(pattern, replacement, source)
    for name in PRESET_NAMES:
        source = source.replace(f'"{name}"', repr(preset_dir))
    return source


# --- Finding the examples ------------------------------------------------------------


FENCE_START = re.compile(r"^(\s*)```(\w*)\s*$")


def fenced_blocks(text):
    """Yield `(language, code, line number)` for each fenced block in
    `text`, with the fence's indentation removed from the code."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE_START.match(lines[index])
        if not match:
            index += 1
            continue
        language = match.group(2)
        start = index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        code = textwrap.dedent("\n".join(body))
        yield language, code, start + 1
        index += 1


def readme_sections():
    """Return `{section title: [(code, line number)]}` of the README's
    python blocks, for `## ` sections that have any."""
    sections = {}
    text = README.read_text(encoding="utf-8")
    # Map each block to the last `## ` heading above it, outside fences.
    headings = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            headings.append((number, line[3:].strip()))
    for language, code, number in fenced_blocks(text):
        if language != "python":
            continue
        title = [name for line, name in headings if line < number][-1]
        sections.setdefault(title, []).append((code, number))
    return sections


def _public_modules():
    for info in pkgutil.walk_packages(
        keras_jetformer.__path__, prefix="keras_jetformer."
    ):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def _members(cls):
    """Yield `(name, function or property)` of a class's own public
    members."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def public_docstrings():
    """Return `[(qualified name, docstring, owning class or None)]` of the
    public modules of `keras_jetformer` and what they define."""
    docstrings = []
    for module in _public_modules():
        docstrings.append((module.__name__, module.__doc__, None))
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != (
                module.__name__
            ):
                continue
            qualified = f"{module.__name__}.{name}"
            if inspect.isfunction(value):
                docstrings.append((qualified, value.__doc__, None))
            elif inspect.isclass(value):
                docstrings.append((qualified, value.__doc__, value))
                for member_name, member in _members(value):
                    docstrings.append(
                        (f"{qualified}.{member_name}", member.__doc__, value)
                    )
    return [entry for entry in docstrings if entry[1]]


def docstring_examples():
    """Return pytest params of every example in the public docstrings."""
    params = []
    parser = doctest.DocTestParser()
    for qualified, docstring, owner in public_docstrings():
        docstring = inspect.cleandoc(docstring)
        for language, code, number in fenced_blocks(docstring):
            if language == "python":
                params.append(
                    pytest.param(
                        ("fenced", code, owner), id=f"{qualified}:{number}"
                    )
                )
        if parser.get_examples(docstring):
            params.append(
                pytest.param(
                    ("doctest", docstring, owner), id=f"{qualified}:doctest"
                )
            )
    return params


README_SECTIONS = readme_sections()
DOCSTRING_EXAMPLES = docstring_examples()


# --- Fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    return save_tiny_preset(tmp_path_factory.mktemp("documentation") / "tiny")


def write_readme_fixtures(directory):
    """Write the files that README examples read, into `directory`:
    `my_images/` with `captions.csv`, for `image_folder_dataset`."""
    folder = directory / "my_images"
    rows = ["file_name,caption"]
    rng = np.random.default_rng(0)
    for name, (width, height), mode in FOLDER_IMAGES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(
            path
        )
        rows += [f"{name},a photo of {name[:3]}", f"{name},another {name[:3]}"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")


def needs_device_mesh(source):
    """Return whether `source` needs several devices; skip the test unless
    the backend is JAX, which can simulate them."""
    if MULTI_DEVICE_MARKER not in source:
        return False
    if keras.config.backend() != "jax":
        pytest.skip(
            "The example builds a device mesh, which this test simulates "
            "only on the JAX backend."
        )
    return True


def run_on_device_mesh(source, directory):
    """Run `source` in a JAX subprocess that has 2 virtual CPU devices."""
    environment = dict(os.environ)
    environment["KERAS_BACKEND"] = "jax"
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=2"
    )
    result = subprocess.run(
        [sys.executable, "-c", MESH_PRELUDE + source],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=MESH_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@contextlib.contextmanager
def example_environment(directory):
    """Run in `directory`, then restore the working directory, `os.environ`
    and the global Keras distribution, which examples may change (a
    changed `KERAS_BACKEND` would reach later subprocesses)."""
    environment = dict(os.environ)
    working_directory = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(working_directory)
        os.environ.clear()
        os.environ.update(environment)
        keras.distribution.set_distribution(None)


@contextlib.contextmanager
def mock_tfds_if_used(source):
    if "tfds_dataset(" not in source:
        yield
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        yield


def run_source(source, namespace, name):
    with mock_tfds_if_used(source):
        exec(compile(source, name, "exec"), namespace)


# --- README ------------------------------------------------------------------------


def test_readme_has_python_examples():
    assert len(README_SECTIONS) >= 5
    assert sum(len(blocks) for blocks in README_SECTIONS.values()) >= 8


@pytest.mark.parametrize("title", sorted(README_SECTIONS))
def test_readme_section(title, preset_dir, tmp_path):
    write_readme_fixtures(tmp_path)
    blocks = README_SECTIONS[title]
    if any(needs_device_mesh(code) for code, _ in blocks):
        sources = [substitute(code, preset_dir) for code, _ in blocks]
        run_on_device_mesh("\n".join(sources), tmp_path)
        return
    namespace = {"__name__": "__readme__"}
    with example_environment(tmp_path):
        for code, line in README_SECTIONS[title]:
            source = substitute(code, preset_dir)
            run_source(source, namespace, f"README.md:{line}")


def test_substitutions_change_only_documented_values():
    source = (
        'JetFormerTextToImage.from_preset("jetformer_tiny_mnist")\n'
        "JetFormerBackbone(num_layers=4, hidden_dim=160, head_dim=40)\n"
        "task.fit(train, epochs=10, steps_per_epoch=1_000)\n"
        'image_folder_dataset("my_images", image_size=32)\n'
    )
    assert substitute(source, "/tmp/tiny") == (
        "JetFormerTextToImage.from_preset('/tmp/tiny')\n"
        "JetFormerBackbone(num_layers=2, hidden_dim=32, head_dim=16)\n"
        "task.fit(train, epochs=1, steps_per_epoch=2)\n"
        'image_folder_dataset("my_images", image_size=32)\n'
    )


# --- Docstrings ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def docstring_context(preset_dir):
    """The names docstring examples use without defining them.

    Modules: `keras`, `keras_hub`, `np`, `keras_jetformer`. Every public
    class and function of `keras_jetformer.models` and
    `keras_jetformer.layers`, by name. From the tiny preset: `backbone`,
    `tokenizer` and `preprocessor` (see `preprocessor_for`). Data: 8 test
    digits as `images` (uint8 `[8, 32, 32, 1]`) with their `labels`,
    `prompts` ("a handwritten seven") and `captions` ("the digit 7"), and
    `dataset`, the same 8 digits as 2 batches of `digits_dataset` dicts.
    """
    import keras_hub

    from keras_jetformer.data import caption_for_label
    from keras_jetformer.data import class_prompt
    from keras_jetformer.data import digits_dataset
    from keras_jetformer.data import load_digits
    from keras_jetformer.models import JetFormerBackbone
    from keras_jetformer.models import JetFormerTokenizer

    context = {
        "keras": keras,
        "keras_hub": keras_hub,
        "np": np,
        "keras_jetformer": keras_jetformer,
    }
    for module in (keras_jetformer.models, keras_jetformer.layers):
        for name in dir(module):
            if not name.startswith("_"):
                context[name] = getattr(module, name)

    images, labels = load_digits("test")
    images, labels = images[:8], labels[:8]
    context.update(
        {
            "backbone": JetFormerBackbone.from_preset(preset_dir),
            "tokenizer": JetFormerTokenizer.from_preset(preset_dir),
            "images": images,
            "labels": labels,
            "prompts": [class_prompt(int(label)) for label in labels],
            "captions": [caption_for_label(int(label), 1) for label in labels],
            "dataset": digits_dataset("test", batch_size=4).take(2),
        }
    )
    return context


def preprocessor_for(owner, preset_dir):
    """The `preprocessor` of an example: the owning task's preprocessor
    class, or the text-to-image preprocessor, loaded from the preset."""
    from keras_jetformer.models import JetFormerTextToImagePreprocessor

    preprocessor_cls = getattr(owner, "preprocessor_cls", None)
    if preprocessor_cls is None:
        preprocessor_cls = JetFormerTextToImagePreprocessor
    return preprocessor_cls.from_preset(preset_dir)


def test_docstrings_have_examples():
    assert len(DOCSTRING_EXAMPLES) >= 5


@pytest.mark.parametrize("example", DOCSTRING_EXAMPLES)
def test_docstring_example(example, docstring_context, preset_dir, tmp_path):
    kind, source, owner = example
    if needs_device_mesh(source):
        assert kind == "fenced", "doctest examples cannot run on a mesh"
        run_on_device_mesh(substitute(source, preset_dir), tmp_path)
        return
    namespace = {
        **docstring_context,
        "preprocessor": preprocessor_for(owner, preset_dir),
    }
    source = substitute(source, preset_dir)
    with example_environment(tmp_path):
        if kind == "fenced":
            run_source(source, namespace, "docstring")
            return
        test = doctest.DocTestParser().get_doctest(
            source, namespace, "docstring", None, 0
        )
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        with mock_tfds_if_used(source):
            runner.run(test)
        assert runner.summarize(verbose=False).failed == 0
