"""keras_mas: continual learning with Memory Aware Synapses for Keras 3."""

import setuptools

setuptools.setup(
    name="keras_mas",
    version="0.1.0",
    description=("Memory Aware Synapses (Aljundi et al., ECCV 2018) for "
                 "Keras 3 on TensorFlow, JAX and PyTorch"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The apps: apps/ in the clone, `keras_mas_apps` installed (a name of
    # this project's own, not a bare `apps`).
    packages=setuptools.find_packages(include=["keras_mas", "keras_mas.*"])
    + ["keras_mas_apps"],
    package_dir={"keras_mas_apps": "apps"},
    entry_points={"console_scripts": [
        "keras-mas-finetune = keras_mas_apps.sequential_finetune:run",
        "keras-mas-compare = keras_mas_apps.compare:run",
        "keras-mas-task-free = keras_mas_apps.task_free:run",
    ]},
    python_requires=">=3.10",
    install_requires=[
        "absl-py>=2.0",
        # MASModel overrides Keras trainer hooks (compute_loss,
        # make_train_function, save/load_own_variables) checked on 3.15.
        "keras>=3.15,<4",
        "matplotlib>=3.7",
        "numpy>=1.26",
        "scikit-learn>=1.3",
        "scipy>=1.11",
        "tensorboard>=2.18",
        "tensorflow>=2.18",
        "tensorflow-datasets>=4.9",
        # tfds.load imports it (through etils) on every dataset's loading
        # path, but TFDS does not declare it: without it, no TFDS dataset
        # loads in a plain install.
        "importlib_resources>=5",
    ],
    extras_require={
        # keras-hub: a KerasHub backbone built from a config (no download)
        # in tests/model_zoo_test.py.
        # setuptools: tests/install_test.py builds the wheel offline with
        # this environment's (70.1 builds wheels without the `wheel` package).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "psutil>=5.9", "keras-hub>=0.32", "setuptools>=70.1"],
        # Keras's JAX backend (KERAS_BACKEND=jax); tests/backends_test.py
        # ran on jax 0.10.2 (the newest for Python 3.11 on the index here).
        "jax": ["jax>=0.4.30"],
        # Keras's PyTorch backend (KERAS_BACKEND=torch): tests/backends_test.py
        # ran on torch 2.13.0, the CPU build. Without a torch installed, pip
        # takes a CUDA build of several GB: install the CPU build first
        # (tools/test.sh does) or the build for your GPU.
        "torch": ["torch>=2.13"],
        # The documentation site (mkdocs.yml): guides and an API reference
        # generated from the docstrings; black formats long signatures.
        "docs": ["mkdocs>=1.6.1", "mkdocs-material>=9.8.1",
                 "mkdocstrings>=1.0.8", "mkdocstrings-python>=2.0.11",
                 "black>=24"],
    },
    license="Apache-2.0",
)
