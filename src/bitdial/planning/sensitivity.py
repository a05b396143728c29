"""Sensitivity profiling: what each module costs in quality at each bit-width.

For every plannable module ``m`` (see :mod:`bitdial.planning.common`) and every width ``b`` it can run
at, three numbers, all relative to the module at its stored maximum ``B`` (``W = W_B``, the reference
the planner's choices are compared with; every cost is 0 at ``b = B``):

``fisher``
    ``½ Σ F ⊙ (W − Ŵ_b)² / T``, the second-order estimate of the loss (≈ KL) increase per token, with
    ``F`` the diagonal empirical Fisher: the mean over calibration windows of the squared gradient of the
    window's summed next-token NLL with respect to the weights, and ``T`` the tokens a window predicts.
``hessian``
    ``tr(ΔW_b H ΔW_bᵀ)`` with ``ΔW_b = Ŵ_b − W`` and ``H = E[x xᵀ]`` over the module's calibration inputs
    ``x``: exactly the mean squared error the change adds to the module's output on those inputs.
``kl``
    the ground truth on a small sample: the mean KL divergence (nats/token, top-64 + rest lower bound)
    of the whole model when only ``m`` runs at ``b`` and every other module at its maximum, against the
    model at maximum bits (:class:`~bitdial.planning.probe.KLProbe`). Measured at a few widths only
    (default 2, 3, 4) because it costs one forward pass per (module, width).

The Spearman rank correlation of each proxy with the ground truth is reported per width and pooled over
all measured (module, width) pairs; the proxy with the best pooled correlation is recorded as
``chosen_proxy`` and is what the planner minimizes unless told otherwise.

Profile file (JSON, ``schema_version`` 1; written atomically)::

    {"schema": "bitdial-sensitivity-profile", "schema_version": 1, "created": ...,
     "artifact": {"path", "header_sha256", "file_bytes"},         # see common.artifact_identity
     "calibration": {"file", "sha256", "n_tokens", "window", "n_windows"},
     "ground_truth": {"file", "offset_tokens", "ctx", "n_windows", "bits", "n_modules", "seconds"} | null,
     "include_embeddings": false, "proxies": ["fisher", "hessian"], "chosen_proxy": "fisher",
     "correlation": {"fisher": {"2": rho, "3": rho, "pooled": rho}, ...},
     "modules": {name: {"shape": [N, K], "n_weights": N*K, "max_bits": B, "bits": [2..B],
                        "bytes": {"2": bytes read at 2 bits, ...},
                        "fisher": {"2": cost, ...}, "hessian": {...}, "kl": {"2": kl, ...} (measured widths)}},
     "fixed": {name: {"shape", "n_weights", "max_bits", "bytes": {...}}}}   # not planned (embeddings)

:func:`load_profile` rejects a file that is not JSON, not a profile, of another schema version, with
missing or non-finite entries, or (given the artifact) measured on a different artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from bitdial.errors import BitdialError
from bitdial.planning.common import (ProfileError, check_schema_version, artifact_identity, atomic_write_json, fixed_modules,
                                     module_bit_range, module_type, plannable_modules, spearman, utc_now)

log = logging.getLogger(__name__)

SCHEMA = "bitdial-sensitivity-profile"
SCHEMA_VERSION = 1
PROXIES = ("fisher", "hessian")

__all__ = ["SCHEMA", "SCHEMA_VERSION", "PROXIES", "Profile", "calibration_windows", "collect_statistics",
           "proxy_costs", "ground_truth", "correlations", "profile_sensitivity", "save_profile", "load_profile",
           "input_site"]


# ---- calibration data -------------------------------------------------------------------------------
def _read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BitdialError(f"calibration text not found: {p}")
    return p.read_text(encoding="utf-8", errors="replace")


def text_ids(tokenizer, path: str | Path, n_tokens: int, offset_tokens: int = 0) -> torch.Tensor:
    """Token ids ``[offset, offset + n_tokens)`` of a text file (tokenized without special tokens)."""
    text = _read_text(path)
    need = offset_tokens + n_tokens
    ids = tokenizer.encode(text[: need * 12 + 1000], bos=False)
    if len(ids) < need:
        ids = tokenizer.encode(text, bos=False)
    return torch.tensor(ids[offset_tokens:need], dtype=torch.long)


def calibration_windows(tokenizer, path: str | Path, n_tokens: int, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows [window] of the first ``n_tokens`` tokens of ``path`` (>= 1 window)."""
    ids = text_ids(tokenizer, path, n_tokens)
    wins = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) >= 2]
    if not wins or len(ids) < min(16, n_tokens):
        raise BitdialError(f"calibration text {path} holds only {len(ids)} tokens; give at least a few paragraphs")
    return wins


# ---- statistics: Fisher diagonal and input second moments ---------------------------------------------
_SITES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


def input_site(name: str) -> str:
    """Modules that read the same input tensor share one ``H = E[x xᵀ]``: q/k/v, and gate/up."""
    t = module_type(name)
    if t in _SITES:
        return name.rsplit(".", 1)[0] + "." + _SITES[t]
    if name == "embed_tokens":
        return "lm_head"  # the tied head's input
    return name


def dense_model(art):
    """The artifact's model dequantized at maximum bits as a dense fp32 Transformer (weights are leaf
    ``nn.Parameter`` s, frozen)."""
    from bitdial.artifact import load_artifact_source
    from bitdial.model.llama import Transformer

    src = load_artifact_source(art.path)
    return Transformer(src.config, src.tensors).eval()


def collect_statistics(net, windows: list[torch.Tensor], modules: list[str], *, fisher: bool = True,
                       hessian: bool = True, progress: bool = False) -> dict[str, Any]:
    """Run a dense model over calibration windows; accumulate the Fisher diagonal and ``H`` per input site.

    ``net``: a dense :class:`~bitdial.model.llama.Transformer`. For each window the summed next-token NLL is
    back-propagated (with ``fisher``) and ``grad²`` of each module's weight is accumulated; forward hooks
    accumulate ``Σ x xᵀ`` of each input site (with ``hessian``). A tied ``embed_tokens`` gets the sum of its
    embedding and head gradients.

    Returns ``{"fisher": {module: F [N, K]}, "hessian": {site: H [K, K]}, "n_windows", "n_tokens" (inputs
    seen per site), "tokens_per_window" (mean predicted tokens)}``; ``F`` and ``H`` are means.
    """
    lin = net.linears()
    params: dict[str, list[torch.nn.Parameter]] = {}
    for n in modules:
        if n == "embed_tokens":
            ps = [net.embed_tokens.weight]
            if "lm_head" in lin and lin["lm_head"].weight.data_ptr() == net.embed_tokens.weight.data_ptr():
                ps.append(lin["lm_head"].weight)
            params[n] = ps
        else:
            params[n] = [lin[n].weight]
    for p in net.parameters():
        p.requires_grad_(False)
    if fisher:
        for ps in params.values():
            for p in ps:
                p.requires_grad_(True)
    sites: dict[str, str] = {n: input_site(n) for n in modules}
    hsum: dict[str, torch.Tensor] = {}
    hcount: dict[str, int] = {}
    hooks = []
    if hessian:
        owner: dict[str, str] = {}
        for n in modules:
            owner.setdefault(sites[n], "lm_head" if n == "embed_tokens" else n)
        for site, mod_name in owner.items():
            def hook(m, args, site=site):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, K]
                hsum[site] = hsum.get(site, 0) + x.T @ x  # [K, K]
                hcount[site] = hcount.get(site, 0) + x.shape[0]

            hooks.append(lin[mod_name].register_forward_pre_hook(hook))
    fsum = {n: torch.zeros_like(ps[0], dtype=torch.float32) for n, ps in params.items()} if fisher else {}
    predicted = 0
    it = windows
    if progress:
        from rich.progress import track

        it = track(windows, description="calibrating (Fisher, H)", transient=True)
    try:
        for w in it:
            ids = w[None]  # [1, T]
            net.max_seq = net.max_batch = 0  # fresh KV caches: no autograd history from the last window
            net.setup_cache(1, ids.shape[1])
            if fisher:
                with torch.enable_grad():
                    logits = net(ids, 0)[0, :-1]  # [T-1, V]
                    loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
                    loss.backward()
                for n, ps in params.items():
                    g = ps[0].grad
                    for p in ps[1:]:
                        g = g + p.grad
                    fsum[n] += g.float() ** 2
                    for p in ps:
                        p.grad = None
            else:
                with torch.no_grad():
                    net(ids, 0)
            predicted += ids.shape[1] - 1
    finally:
        for h in hooks:
            h.remove()
        for ps in params.values():
            for p in ps:
                p.requires_grad_(False)
                p.grad = None
    nw = len(windows)
    return {"fisher": {n: f / nw for n, f in fsum.items()},
            "hessian": {s: h / hcount[s] for s, h in hsum.items()},
            "n_windows": nw, "n_tokens": dict(hcount), "tokens_per_window": predicted / max(nw, 1),
            "sites": sites}


def proxy_costs(art, modules: list[str], stats: dict[str, Any], bits: dict[str, list[int]]) -> dict[str, dict[str, dict[int, float]]]:
    """``{proxy: {module: {bits: cost}}}`` for the proxies whose statistics ``stats`` holds (see module doc)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    F, H, sites = stats.get("fisher") or {}, stats.get("hessian") or {}, stats["sites"]
    tpw = max(float(stats.get("tokens_per_window", 1.0)), 1.0)
    if F:
        out["fisher"] = {}
    if H:
        out["hessian"] = {}
    for n in modules:
        qt = art.qtensor(n)
        W = qt.dequantize(qt.max_bits)  # [N, K]
        Hm = H.get(sites[n]) if H else None
        for b in bits[n]:
            if b == qt.max_bits:
                d = None
            else:
                d = qt.dequantize(b) - W  # [N, K]
            if F:
                v = 0.0 if d is None else 0.5 * float((F[n].double() * d.double() ** 2).sum()) / tpw
                out["fisher"].setdefault(n, {})[b] = v
            if H:
                v = 0.0 if d is None else float(((d @ Hm) * d).double().sum())
                out["hessian"].setdefault(n, {})[b] = max(v, 0.0)
        del W
    return out


# ---- ground truth ----------------------------------------------------------------------------------------
def ground_truth(probe, modules: list[str], bits: list[int], *, progress: bool = False) -> dict[str, dict[int, float]]:
    """``{module: {bits: KL}}``: the whole model's KL when only that module drops to ``bits``."""
    out: dict[str, dict[int, float]] = {}
    todo = [(n, b) for n in modules for b in bits if b < probe.max_bits[n] and b >= probe.art.modules[n]["min_bits"]]
    it = todo
    if progress:
        from rich.progress import track

        it = track(todo, description="ground truth (KL per module)", transient=True)
    for n, b in it:
        out.setdefault(n, {})[b] = probe.kl({n: b})
    probe.apply({})
    return out


def correlations(costs: dict[str, dict[str, dict[int, float]]], kl: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """Spearman correlation of each proxy with the measured KL over modules, per width and pooled."""
    out: dict[str, dict[str, float]] = {}
    widths = sorted({b for d in kl.values() for b in d})
    for proxy, per in costs.items():
        r: dict[str, float] = {}
        pa, pb = [], []
        for b in widths:
            a = [per[n][b] for n in kl if b in kl[n] and b in per.get(n, {})]
            g = [kl[n][b] for n in kl if b in kl[n] and b in per.get(n, {})]
            r[str(b)] = spearman(a, g)
            pa += a
            pb += g
        r["pooled"] = spearman(pa, pb)
        out[proxy] = r
    return out


def _choose(corr: dict[str, dict[str, float]], available: list[str]) -> str:
    best, best_r = available[0], -math.inf
    for p in available:
        r = corr.get(p, {}).get("pooled", math.nan)
        if not math.isnan(r) and r > best_r:
            best, best_r = p, r
    return best


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def profile_sensitivity(art, calib: str | Path, *, calib_tokens: int = 4096, window: int = 256,
                        proxies: tuple[str, ...] = PROXIES, gt_text: str | Path | None = None,
                        gt_ctx: int = 128, gt_windows: int = 2, gt_bits: list[int] | None = None,
                        gt_modules: int | None = None, include_embeddings: bool = False, min_bits: int = 2,
                        seed: int = 0, cache_dir=None, progress: bool = False) -> dict[str, Any]:
    """Measure a sensitivity profile of ``art`` (an open artifact); returns the profile dict (module doc).

    ``gt_text`` defaults to the calibration file, read *after* the calibration tokens (held out).
    ``gt_bits`` (default ``[2, 3, 4]``; ``[]`` = every width) are the widths the ground truth measures;
    ``gt_modules`` measures a random sample of that many modules (default: all); ``gt_windows = 0`` skips
    the ground truth (then the chosen proxy is ``fisher`` if measured).
    """
    for p in proxies:
        if p not in PROXIES:
            raise BitdialError(f"unknown proxy {p!r}; choose from {', '.join(PROXIES)}")
    t_start = time.perf_counter()
    modules = plannable_modules(art, include_embeddings)
    if not modules:
        raise BitdialError(f"{art.path}: no plannable modules")
    bits = {n: module_bit_range(art, n, min_bits) for n in modules}
    tok = art.tokenizer
    wins = calibration_windows(tok, calib, calib_tokens, window)
    n_calib = sum(len(w) for w in wins)
    log.info("calibration: %d tokens in %d windows of %s", n_calib, len(wins), window)

    t0 = time.perf_counter()
    net = dense_model(art)
    stats = collect_statistics(net, wins, modules, fisher="fisher" in proxies, hessian="hessian" in proxies,
                               progress=progress)
    del net
    costs = proxy_costs(art, modules, stats, bits)
    del stats
    t_stats = time.perf_counter() - t0
    log.info("proxies computed in %.1f s", t_stats)

    kl: dict[str, dict[int, float]] = {}
    gt_meta = None
    if gt_windows > 0:
        t0 = time.perf_counter()
        from bitdial.planning.probe import KLProbe

        gt_file = Path(gt_text) if gt_text is not None else Path(calib)
        offset = n_calib if gt_text is None else 0
        ids = text_ids(tok, gt_file, gt_ctx * gt_windows, offset_tokens=offset)
        if ids.numel() < gt_ctx * gt_windows and gt_text is None:  # short calibration file: reuse its start
            offset = 0
            ids = text_ids(tok, gt_file, gt_ctx * gt_windows)
        probe = KLProbe(art, ids, ctx=gt_ctx, n_windows=gt_windows, cache_dir=cache_dir, progress=progress)
        if gt_bits is None:
            gt_bits = [2, 3, 4]
        wbits = sorted(gt_bits) if gt_bits else sorted({b for bs in bits.values() for b in bs})
        sample = list(modules)
        if gt_modules is not None and gt_modules < len(sample):
            sample = sorted(random.Random(seed).sample(sample, gt_modules), key=modules.index)
        kl = ground_truth(probe, sample, wbits, progress=progress)
        gt_meta = {"file": str(gt_file.resolve()), "offset_tokens": offset, "ctx": gt_ctx, "n_windows": gt_windows,
                   "bits": wbits, "n_modules": len(sample), "n_tokens": probe.n_tokens,
                   "seconds": round(time.perf_counter() - t0, 2), "reference": "the artifact at maximum bits",
                   "statistic": "mean KL, top-64 + rest lower bound (nats/token)"}
        del probe
    corr = correlations(costs, kl) if kl else {}
    chosen = _choose(corr, [p for p in PROXIES if p in costs]) if corr else (
        "fisher" if "fisher" in costs else next(iter(costs)))

    def entry(n: str, with_costs: bool) -> dict[str, Any]:
        m = art.modules[n]
        qt = art.qtensor(n)
        bs = bits[n] if n in bits else module_bit_range(art, n, min_bits)
        e: dict[str, Any] = {"shape": list(m["shape"]), "n_weights": int(m["shape"][0]) * int(m["shape"][1]),
                             "max_bits": int(m["max_bits"]), "bits": bs,
                             "bytes": {str(b): int(qt.bytes_read(b)) for b in bs}}
        if with_costs:
            for p, per in costs.items():
                e[p] = {str(b): float(v) for b, v in per[n].items()}
            if n in kl:
                e["kl"] = {str(b): float(v) for b, v in kl[n].items()}
        return e

    cal_path = Path(calib)
    prof = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": utc_now(),
        "artifact": artifact_identity(art),
        "calibration": {"file": str(cal_path.resolve()), "sha256": _sha256_file(cal_path), "n_tokens": n_calib,
                        "window": window, "n_windows": len(wins)},
        "ground_truth": gt_meta,
        "include_embeddings": include_embeddings, "min_bits": min_bits,
        "proxies": [p for p in PROXIES if p in costs], "chosen_proxy": chosen,
        "correlation": {p: {k: (None if math.isnan(v) else round(v, 6)) for k, v in r.items()} for p, r in corr.items()},
        "modules": {n: entry(n, True) for n in modules},
        "fixed": {n: entry(n, False) for n in fixed_modules(art, include_embeddings)},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    log.info("profile: %d modules, chosen proxy %s (pooled Spearman %s)", len(modules), chosen,
             prof["correlation"].get(chosen, {}).get("pooled"))
    return prof


# ---- files ----------------------------------------------------------------------------------------------
class Profile:
    """A validated sensitivity profile (see the module docstring for the fields)."""

    def __init__(self, data: dict[str, Any], path: str | Path | None = None) -> None:
        self.data = data
        self.path = None if path is None else Path(path)

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.data["modules"]

    @property
    def fixed(self) -> dict[str, dict[str, Any]]:
        return self.data.get("fixed") or {}

    @property
    def chosen_proxy(self) -> str:
        return self.data["chosen_proxy"]

    @property
    def proxies(self) -> list[str]:
        return list(self.data["proxies"])

    def costs(self, proxy: str | None = None) -> dict[str, dict[int, float]]:
        """``{module: {bits: cost}}`` of ``proxy`` (default: the chosen one). ``"kl"`` works when the ground
        truth covers every width of every module (a cost of 0 is implied at the maximum)."""
        proxy = proxy or self.chosen_proxy
        out: dict[str, dict[int, float]] = {}
        for n, m in self.modules.items():
            if proxy == "kl":
                got = {int(b): float(v) for b, v in (m.get("kl") or {}).items()}
                got.setdefault(int(m["max_bits"]), 0.0)
                missing = [b for b in m["bits"] if b not in got]
                if missing:
                    raise ProfileError(f"the profile's measured KL does not cover {n} at {missing} bits: measure "
                                       "every width (--gt-bits all) to plan on it, or use a proxy")
                out[n] = {b: got[b] for b in m["bits"]}
            else:
                if proxy not in m:
                    raise ProfileError(f"proxy {proxy!r} is not in this profile (it has {', '.join(self.proxies)})")
                out[n] = {int(b): float(v) for b, v in m[proxy].items()}
        return out

    def identity(self) -> dict[str, Any]:
        return self.data["artifact"]

    def check_artifact(self, art) -> None:
        """Raise ProfileError unless this profile was measured on ``art`` (same header checksum)."""
        ident = artifact_identity(art)
        mine = self.data["artifact"].get("header_sha256")
        if mine != ident["header_sha256"]:
            raise ProfileError(
                f"profile {self.path or ''} was measured on {self.data['artifact'].get('path')} (header sha256 "
                f"{str(mine)[:12]}...), not on {art.path} (header sha256 {ident['header_sha256'][:12]}...): "
                "re-run `bitdial profile sensitivity` on this artifact")
        for n, m in self.modules.items():
            if n not in art.modules or list(art.modules[n]["shape"]) != list(m["shape"]):
                raise ProfileError(f"profile module {n} does not match the artifact; re-run `bitdial profile sensitivity`")


def save_profile(profile: dict[str, Any] | Profile, path: str | Path) -> Path:
    """Validate and write a profile atomically."""
    data = profile.data if isinstance(profile, Profile) else profile
    validate_profile(data, str(path))
    return atomic_write_json(path, data)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_profile(d: Any, where: str = "profile") -> None:
    """Raise ProfileError naming the first problem of a profile dict."""
    fix = " Re-run `bitdial profile sensitivity` to rebuild it."
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: not a sensitivity profile (the JSON is not an object).{fix}")
    if d.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: not a bitdial sensitivity profile (schema {d.get('schema')!r}, expected "
                           f"{SCHEMA!r}); a device profile goes to --device.")
    check_schema_version(d.get("schema_version"), SCHEMA_VERSION, "profile", where, fix)
    for key in ("artifact", "proxies", "chosen_proxy", "modules"):
        if key not in d:
            raise ProfileError(f"{where}: key {key!r} is missing: corrupt profile.{fix}")
    if not isinstance(d["artifact"], dict) or not isinstance(d["artifact"].get("header_sha256"), str):
        raise ProfileError(f"{where}: the artifact identity is missing or malformed: corrupt profile.{fix}")
    proxies = d["proxies"]
    if not isinstance(proxies, list) or not proxies or any(p not in PROXIES for p in proxies):
        raise ProfileError(f"{where}: proxies {proxies!r} are malformed: corrupt profile.{fix}")
    if d["chosen_proxy"] not in proxies:
        raise ProfileError(f"{where}: chosen proxy {d['chosen_proxy']!r} is not among {proxies}: corrupt profile.{fix}")
    mods = d["modules"]
    if not isinstance(mods, dict) or not mods:
        raise ProfileError(f"{where}: no modules: corrupt profile.{fix}")
    for n, m in list(mods.items()) + list((d.get("fixed") or {}).items()):
        planned = n in mods
        try:
            shape = [int(s) for s in m["shape"]]
            bits = [int(b) for b in m["bits"]]
            if len(shape) != 2 or not bits or int(m["max_bits"]) != max(bits):
                raise ValueError("shape/bits")
            for b in bits:
                if not _finite(m["bytes"][str(b)]) or m["bytes"][str(b)] <= 0:
                    raise ValueError(f"bytes at {b} bits")
            if planned:
                for p in proxies:
                    for b in bits:
                        c = m[p][str(b)]
                        if not _finite(c) or c < 0:
                            raise ValueError(f"{p} cost at {b} bits is {c!r}")
                for b, c in (m.get("kl") or {}).items():
                    if not _finite(c):
                        raise ValueError(f"kl at {b} bits is {c!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where}: module {n}: entry is missing or malformed ({e}): corrupt profile.{fix}") from None


def load_profile(path: str | Path, art=None) -> Profile:
    """Read and validate a profile file; with ``art``, also check it was measured on that artifact."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"sensitivity profile not found: {p} (make one with `bitdial profile sensitivity`)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{p}: not valid JSON ({e}): corrupt or truncated profile. Re-run "
                           "`bitdial profile sensitivity` to rebuild it.") from None
    validate_profile(d, str(p))
    prof = Profile(d, p)
    if art is not None:
        prof.check_artifact(art)
    return prof
