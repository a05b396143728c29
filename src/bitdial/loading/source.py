"""What every model loader returns: a config, lazily read fp32 tensors, and a tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitdial.loading.config import ModelConfig
from bitdial.loading.tokenizer import Tokenizer


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only name -> fp32 tensor map that reads (and dequantizes) a tensor only when asked.

    Loaders keep files memory-mapped, so a model larger than RAM can be walked tensor by tensor.
    """

    def __init__(self, names: list[str], getter: Callable[[str], torch.Tensor],
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        self._names = list(names)
        self._set = set(names)
        self._get = getter
        self.shapes = shapes or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._set


@dataclass
class LoadedModel:
    config: ModelConfig
    tensors: Mapping[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str  # what was loaded, e.g. a file path
    files: list[Path] = field(default_factory=list)
    kind: str = ""  # "gguf", "hf", "bitdial"

    def fingerprint(self) -> str:
        """sha256 over the source files (read in chunks), to record where an artifact came from."""
        h = hashlib.sha256()
        for f in sorted(self.files):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        return h.hexdigest()
