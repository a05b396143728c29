"""Model sources: a GGUF file, a Hugging Face directory, a .bitdial artifact, or ``default``.

``load_model(spec)`` returns a :class:`LoadedModel` (config, lazily read fp32 tensors, tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from bitdial.errors import ModelNotFoundError
from bitdial.loading.config import ModelConfig
from bitdial.loading.default import default_model_path
from bitdial.loading.source import LazyTensors, LoadedModel
from bitdial.loading.tokenizer import Tokenizer

__all__ = ["ModelConfig", "LoadedModel", "LazyTensors", "Tokenizer", "load_model", "resolve_model_path",
           "default_model_path"]


def resolve_model_path(spec: str | Path) -> Path:
    """``default`` -> the packaged SmolLM2 GGUF; anything else must be an existing path."""
    if str(spec) == "default":
        return default_model_path()
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelNotFoundError(
            f"model not found: {spec!r} (give a .gguf file, a .bitdial artifact, a Hugging Face model "
            "directory, or 'default')"
        )
    return p


def load_model(spec: str | Path) -> LoadedModel:
    """Open a model source. Tensors are read (and dequantized) lazily, on first access."""
    p = resolve_model_path(spec)
    if p.is_dir():
        from bitdial.loading.hf_loader import load_hf_dir

        return load_hf_dir(p)
    with open(p, "rb") as f:
        magic = f.read(8)
    if magic[:4] == b"GGUF":
        from bitdial.loading.gguf_loader import load_gguf

        return load_gguf(p)
    if p.suffix == ".bitdial":
        from bitdial.artifact import load_artifact_source

        return load_artifact_source(p)
    if p.suffix == ".gguf":
        from bitdial.loading.gguf_loader import load_gguf

        return load_gguf(p)  # raises a clear "not a GGUF file" error
    raise ModelNotFoundError(
        f"{p}: unknown model file type (expected a .gguf file, a .bitdial artifact or a model directory)"
    )
