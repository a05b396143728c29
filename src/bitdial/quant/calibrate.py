"""Importance of each input column (mean x² of its activations on calibration text), as llama.cpp's
importance matrix: weighting the quantization error by it protects the columns that carry signal.

``calib="random"`` needs no text: the model reads uniformly random token ids. Which input columns carry
large activations is mostly a property of the model (its residual stream's outlier channels), not of the
text, so random tokens find most of them (docs/bitplanes.md, section 8, "Stop 26: importance from random
tokens")."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bitdial.loading.source import LoadedModel
from bitdial.model.llama import DenseLinear, Transformer

log = logging.getLogger(__name__)


#: ``collect_importance(calib=RANDOM)``: random token ids instead of a text file.
RANDOM = "random"
#: tokens of the random calibration that ``bitdial quantize`` runs by default (the measured setting)
RANDOM_TOKENS = 4096


def random_ids(vocab_size: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``n_tokens`` token ids drawn uniformly from the vocabulary, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_tokens,), generator=g)


def calibration_ids(tokenizer, path: str | Path, n_tokens: int) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text[: n_tokens * 12])[:n_tokens]
    if len(ids) < 16:
        raise ValueError(f"calibration file {p} holds only {len(ids)} tokens; give at least a few paragraphs")
    return torch.tensor(ids)


def collect_importance(model: LoadedModel, calib: str | Path, *, n_tokens: int = 8192, ctx: int = 512,
                       progress: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the full-precision model over ``n_tokens`` of ``calib`` in windows of ``ctx``; return
    {module name: mean x² per input column [K]}. A tied head's importance is given to ``embed_tokens``.

    ``calib`` is a UTF-8 text file, or the string ``"random"`` (``RANDOM``): token ids drawn uniformly from
    the vocabulary with ``seed`` (a file of that name is ``./random``, given as a ``Path``)."""
    net = Transformer(model.config, model.tensors).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in net.linears().items():
        if not isinstance(mod, DenseLinear):
            continue

        def hook(m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [tokens, K]
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    use_random = isinstance(calib, str) and calib == RANDOM
    if use_random:
        if n_tokens < 16:
            raise ValueError(f"random calibration needs at least 16 tokens, got {n_tokens}")
        ids = random_ids(model.config.vocab_size, n_tokens, seed)
    else:
        ids = calibration_ids(model.tokenizer, calib, n_tokens)
    windows = [ids[i:i + ctx] for i in range(0, len(ids), ctx) if len(ids[i:i + ctx]) > 1]
    it = windows
    if progress:
        from rich.progress import track

        it = track(windows, description="calibrating (importance)", transient=True)
    with torch.inference_mode():
        net.setup_cache(1, ctx)
        for w in it:
            net(w[None], 0)
    for h in hooks:
        h.remove()
    imp = {n: sums[n] / counts[n] for n in sums}
    if "lm_head" in imp and "lm_head.weight" not in model.tensors:
        imp["embed_tokens"] = imp.pop("lm_head")
    log.info("importance collected on %d %s tokens for %d modules", len(ids),
             "random" if use_random else "calibration", len(imp))
    return imp
