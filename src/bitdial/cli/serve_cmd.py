"""``bitdial serve``: the OpenAI-compatible server (extra ``[serve]``: FastAPI + uvicorn).

Wired into the main app with ``register(app)`` (see :mod:`bitdial.cli.main`). The server lives in
:mod:`bitdial.serving`; this module parses options, loads the model and runs uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Optional

import typer

from bitdial.errors import BitdialError

log = logging.getLogger(__name__)

SERVE_EXTRA_HINT = "bitdial serve needs the [serve] extra: pip install 'bitdial[serve]' (fastapi, uvicorn)"


def _main():
    from bitdial.cli import main  # lazy: main imports this module's register()

    return main


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load(m, model: str, threads: Optional[int], bits: Optional[int], bits_map: Optional[Path],
          plan: Optional[str], dynamic: Optional[float], head_bits: Optional[str] = None):
    """Load the engine: static widths through the shared CLI loader, or every dynamic policy for --dynamic."""
    if dynamic is None:
        return m._load_engine(model, threads, bits, bits_map, plan, head_bits=head_bits)
    import inspect

    from bitdial.runtime.engine import Engine

    if "dynamic" not in inspect.signature(Engine.load).parameters:
        raise BitdialError("--dynamic needs dynamic precision, which this version of bitdial does not have")
    return Engine.load(model, threads=threads, dynamic=dynamic, head_bits=head_bits)


def serve_cmd(
    model: str = typer.Argument(..., help="The .bitdial artifact to serve (any model source works; only an "
                                          "artifact's precision can be chosen per request)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8080, "--port", "-p", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="BITDIAL_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait behind the running one; "
                                                          "more are refused with 429."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens",
                                                    help="Longest prompt accepted (default: the model's context)."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="Largest max_tokens a request may ask for."),
    bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Default: every decoder linear at this many bits."),
    bits_map: Optional[Path] = typer.Option(None, "--bits-map", help="Default: a {module pattern: bits} JSON map."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Default: a plan stored in the artifact."),
    dynamic: Optional[float] = typer.Option(None, "--dynamic", help="Default dynamic-precision target (needs "
                                                                     "an artifact calibrated for dynamic precision)."),
    head_bits: Optional[str] = typer.Option(None, "--head-bits", help="Output head width: BITS, or TARGET=BITS,... "
                                                                     "per dynamic target (e.g. 2=4,2.5=5; default: "
                                                                     "the stored maximum)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Default policy of requests: fixed, rule or bandit "
                                                                 "(default: rule with --max-ms-per-token, else fixed)."),
    max_ms_per_token: Optional[float] = typer.Option(None, "--max-ms-per-token",
                                                     help="Default latency target per decode step (ms)."),
    controller: bool = typer.Option(True, "--controller/--no-controller",
                                    help="Start the precision controller (bitdial.control) when available."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id reported by the API "
                                                                        "(default: the file's name)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads for compute (default: all cores)."),
    adapt_threads: bool = typer.Option(False, "--adapt-threads/--no-adapt-threads",
                                       help="Let the controller run a request on fewer threads when other "
                                            "processes hold cores (default off: docs/control.md, \"Threads\")."),
) -> None:
    """Serve a model behind an OpenAI-compatible HTTP API (chat and text completions, SSE streaming)."""
    m = _main()
    try:
        import torch
        import uvicorn

        from bitdial.serving.app import ServerConfig, create_app
        from bitdial.serving.precision import (ControlAdapter, PrecisionGovernor, backend_for, probe_latency,
                                               probe_thread_latency)
    except ImportError as e:
        m._fail(BitdialError(f"{SERVE_EXTRA_HINT} ({e})"))

    try:
        if policy is None:
            policy = "rule" if max_ms_per_token is not None else "fixed"
        if policy not in ("fixed", "rule", "bandit"):
            raise BitdialError(f"--policy must be fixed, rule or bandit, got {policy!r}")
        if dynamic is not None and any(x is not None for x in (bits, bits_map, plan)):
            raise BitdialError("give --dynamic or one of --bits/--bits-map/--plan, not both")
        if max_ms_per_token is not None and max_ms_per_token <= 0:
            raise BitdialError(f"--max-ms-per-token must be > 0, got {max_ms_per_token}")
        if not 0 <= port <= 65535:
            raise BitdialError(f"--port must be in 0..65535, got {port}")
        config = ServerConfig(model_id=model_name or (Path(model).stem if model != "default" else "default"),
                              api_key=api_key, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                              max_tokens_limit=max_tokens_limit)
        config.validate()
        eng = _load(m, model, threads, bits, bits_map, plan, dynamic, head_bits)
        if threads:
            from bitdial.planning.device import kernel_threads

            kernel_threads(threads)
        backend = backend_for(eng)
        if dynamic is not None and backend.kind != "dynamic":
            raise BitdialError(f"--dynamic needs an artifact with dynamic-precision policies; {model} has "
                               f"{backend.kind} precision only (use --bits, or calibrate the artifact first)")
        control = None
        if controller and len(backend.targets) > 1:
            import importlib.util

            if importlib.util.find_spec("bitdial.control") is not None:
                fewer = range(1, torch.get_num_threads() if adapt_threads else 1)  # it may leave busy cores alone
                control = ControlAdapter.create(backend.targets, probe_latency(eng.model, backend),
                                                probe_thread_latency(eng.model, backend, fewer),
                                                adapt_threads=adapt_threads)
        if policy != "fixed" and control is None:
            m.err.print(f"[yellow]--policy {policy}: the precision controller is not available; "
                        "requests run at a fixed target[/]")
        governor = PrecisionGovernor(backend, default_target=dynamic, default_policy=policy,
                                     default_max_ms=max_ms_per_token, control=control)
        app = create_app(eng, config, governor=governor)
    except (BitdialError, ValueError, FileNotFoundError) as e:
        m._fail(e)
    if not _is_loopback(host) and not api_key:
        m.err.print(f"[yellow]warning: listening on {host} without an API key: anyone who can reach this port "
                    "can use the model (set --api-key or BITDIAL_API_KEY)[/]")
    if backend.targets:
        precision = (f"{backend.kind} precision, targets {', '.join(f'{t:g}' for t in backend.targets)}; "
                     f"controller {'on' if control else 'off'}")
    else:
        precision = "a float model: precision fixed"
    m.err.print(f"[bold]bitdial serve[/] {config.model_id} ({precision}) on http://{host}:{port}/v1 — "
                f"queue {max_queue}, max_tokens ≤ {max_tokens_limit}{', API key required' if api_key else ''}")
    verbose = logging.getLogger("bitdial").getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=verbose,
                timeout_graceful_shutdown=5, server_header=False)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``bitdial`` app."""
    app.command("serve")(serve_cmd)
