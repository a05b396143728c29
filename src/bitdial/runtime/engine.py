"""An engine: a model source (GGUF, HF directory or .bitdial artifact) turned into a runnable decoder."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitdial.errors import BitdialError
from bitdial.loading import LoadedModel, Tokenizer, load_model, resolve_model_path
from bitdial.model.llama import Transformer

log = logging.getLogger(__name__)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every core torch sees). Returns the count in use."""
    if threads is not None and threads < 1:
        raise BitdialError(f"--threads must be >= 1, got {threads}")
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def read_bits_map(path: str | Path) -> dict[str, int]:
    """A ``{module pattern: bits}`` JSON file (``"default"`` key optional)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise BitdialError(f"bits map not found: {p}") from None
    except json.JSONDecodeError as e:
        raise BitdialError(f"bits map {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, int) for v in d.values()):
        raise BitdialError(f"bits map {p} must be a JSON object of pattern -> integer bits, e.g. "
                           '{"*.mlp.down_proj": 6, "default": 4}')
    return d


def parse_head_bits(spec: str | int | Mapping | None) -> dict[float | None, int]:
    """The output head's width per dynamic target: ``"6"`` (every target), ``"2=4,2.5=5"`` or a mapping
    ``{target: bits}``, with an optional ``default`` (targets not listed; else the stored maximum).
    Returns ``{target or None (default): bits}``."""
    if spec is None:
        return {}
    if isinstance(spec, int):
        items = [("default", spec)]
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            key, eq, val = part.rpartition("=")
            items.append((key if eq else "default", val))
    out: dict[float | None, int] = {}
    for key, val in items:
        try:
            t = None if key in ("default", None) else float(key)
            b = int(val)
        except (TypeError, ValueError):
            raise BitdialError(f"--head-bits {spec!r}: {key}={val} is not TARGET=BITS; write e.g. 6 (every "
                               "target) or 2=4,2.5=5,default=8") from None
        out[t] = b
    return out


def is_artifact(spec: str | Path) -> bool:
    return str(spec) != "default" and Path(spec).suffix == ".bitdial"


@dataclass
class Engine:
    model: Transformer
    tokenizer: Tokenizer
    source: str
    source_model: LoadedModel | None = None
    load_s: float = 0.0
    head_bits: dict[float | None, int] = field(default_factory=dict)  # output head width per target
    _head_loaded: int | None = field(default=None, repr=False)  # its width before set_head_bits

    @classmethod
    def load(cls, spec: str | Path, *, threads: int | None = None,
             bits: int | Mapping[str, int] | None = None, dynamic: float | None = None,
             prefill: str = "max", head_bits: str | int | Mapping | None = None) -> "Engine":
        """Load any model source. ``bits`` (an int or a {pattern: bits} map) applies to artifacts only.

        ``dynamic``: run the artifact's dynamic policy for this target (every stored target is loaded, so
        :meth:`set_target` can switch between them later); ``prefill``: ``max`` or ``per-token``;
        ``head_bits``: the output head's width per target (:meth:`set_head_bits`).
        """
        set_threads(threads)
        t0 = time.perf_counter()
        path = resolve_model_path(spec)
        if is_artifact(path):
            from bitdial.artifact import open_artifact
            from bitdial.runtime.anyprec import build_model

            art = open_artifact(path)
            if dynamic is not None:
                from bitdial.policies import attach, load_policy, policy_max_bits

                if bits is not None:
                    raise BitdialError("give either static widths (--bits/--bits-map/--plan) or --dynamic, not both")
                load_policy(art, dynamic)  # a clear error naming the stored targets if absent
                model = build_model(art, policy_max_bits(art))
                attach(model, art, None, prefill).set_target(dynamic)
            else:
                model = build_model(art, bits)
            eng = cls(model, art.tokenizer, str(path))
        else:
            if bits is not None or dynamic is not None:
                raise BitdialError("--bits/--bits-map/--plan/--dynamic need a .bitdial artifact; quantize the model "
                                   "first with `bitdial quantize`")
            src = load_model(path)
            from bitdial.runtime.fused import install_dense

            model = Transformer(src.config, src.tensors).eval().fuse()
            install_dense(model)  # the fp32 decode step in one native call (bitdial/runtime/fused.py)
            eng = cls(model, src.tokenizer, src.source, src)
        if head_bits is not None:
            eng.set_head_bits(head_bits)
        eng.load_s = time.perf_counter() - t0
        log.info("loaded %s in %.1f s", eng.source, eng.load_s)
        return eng

    # ---- dynamic precision ------------------------------------------------------------------------
    @property
    def targets(self) -> list[float]:
        """The dynamic-precision targets this engine can switch between (empty without policies)."""
        rt = getattr(self.model, "dynamic", None)
        return rt.targets if rt is not None else []

    @property
    def target(self) -> float | None:
        rt = getattr(self.model, "dynamic", None)
        return rt.target if rt is not None else None

    def set_target(self, target: float | None) -> None:
        """Switch to the dynamic policy of ``target`` bits (None: the static widths), without reloading."""
        rt = getattr(self.model, "dynamic", None)
        if rt is None:
            if target is None:
                return
            raise BitdialError("this model has no dynamic policies: load an artifact with --dynamic after "
                               "`bitdial calibrate`")
        rt.set_target(target)
        self._apply_head_bits()

    def set_head_bits(self, spec: str | int | Mapping | None) -> None:
        """Run the output head at these widths: ``{target: bits}`` with an optional ``default`` (see
        :func:`parse_head_bits`); targets not covered run it as loaded (its stored maximum unless a bits map
        said otherwise). The head is read once per decode step in full (49152 x 576 weights for SmolLM2-135M:
        at 8 bits as many bytes as every decoder linear at 2 bits), so a narrower head is what makes the
        lowest targets faster. Applies at once and at every :meth:`set_target`."""
        from bitdial.runtime.anyprec import AnyPrecisionLinear

        head = getattr(self.model, "lm_head", None)
        parsed = parse_head_bits(spec)
        if parsed and not isinstance(head, AnyPrecisionLinear):
            raise BitdialError("--head-bits needs a .bitdial artifact (the output head of this model is not "
                               "quantized)")
        if parsed:
            lo, hi = head.min_bits, head.max_bits
            bad = {t: b for t, b in parsed.items() if not lo <= b <= hi}
            if bad:
                raise BitdialError(f"--head-bits: the output head stores {lo}..{hi} bits; got "
                                   + ", ".join(f"{'default' if t is None else f'{t:g}'}={b}" for t, b in bad.items()))
            unknown = [t for t in parsed if t is not None and t not in self.targets]
            if unknown:
                raise BitdialError(f"--head-bits: no dynamic policy for target(s) "
                                   f"{', '.join(f'{t:g}' for t in unknown)} (stored: "
                                   f"{', '.join(f'{t:g}' for t in self.targets) or 'none'})")
            if self._head_loaded is None:
                self._head_loaded = head.bits
        self.head_bits = parsed
        self._apply_head_bits()

    def _apply_head_bits(self) -> None:
        if self._head_loaded is None:
            return
        b = self.head_bits.get(self.target, self.head_bits.get(None, self._head_loaded))
        if b is not None and self.model.lm_head.bits != b:
            self.model.lm_head.bits = b

    @property
    def head_width(self) -> int | None:
        """The output head's width in effect (None for a float model)."""
        return getattr(getattr(self.model, "lm_head", None), "bits", None)
