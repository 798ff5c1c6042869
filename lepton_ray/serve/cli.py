"""``lepton-ray optimize | serve | predict``: argument parsing only; the work is in the serve API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lepton_ray.config import ServeConfig

VERBOSE_HELP = "show Ray's own INFO and backend lines too (by default only its warnings)"

__all__ = ["add_commands"]


def _serve_config(args: argparse.Namespace, keys: tuple[str, ...]) -> ServeConfig:
    values: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return ServeConfig(**values)


def _optimize(args: argparse.Namespace) -> int:
    from lepton_ray.serve.optimize import optimize

    cfg = _serve_config(args, ("max_accuracy_drop", "candidates", "bench_batch_size", "threads_per_replica"))
    report = optimize(args.checkpoint, args.eval, args.output, config=cfg, progress=not args.no_progress)
    if args.json:
        sys.stdout.flush()
        print(json.dumps(report))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lepton_ray.serve.app import deploy
    from lepton_ray.serve.bundle import check_name, load_bundle
    from lepton_ray.train.trainer import ensure_ray

    cfg = _serve_config(args, ("port", "host", "replicas", "max_batch_size", "batch_wait_ms", "max_instances",
                               "threads_per_replica", "auth_token_env"))
    # every option is checked here, before Ray starts: a bad one is a one-line error (exit 2), not a dead replica
    bundle = load_bundle(args.bundle)
    name = check_name(args.name, "--name") if args.name else bundle.name
    _check_serve_options(cfg)
    ensure_ray(verbose=args.verbose)
    stop = _stop_on_signals()  # after ray.init, whose handlers make a SIGTERM abort with a stack trace
    url = deploy(args.bundle, cfg, model_name=args.name, verbose=args.verbose)  # a signal meanwhile stops the server once it is up
    if args.json:
        print(json.dumps({"url": url, "predict": f"{url}/predict", "infer": f"{url}/v2/models/{name}/infer", "model_name": name,
                          "replicas": cfg.replicas}), flush=True)
    else:
        where = "" if cfg.host == "127.0.0.1" else f", listening on {cfg.host}:{cfg.port}"
        print(f"serving {args.bundle} at {url} ({cfg.replicas} replica(s), one URL{where}): POST {url}/predict, "
              f"POST {url}/v2/models/{name}/infer; health: {url}/healthz, metrics: {url}/metrics; Ctrl-C stops", flush=True)
    stop.wait()
    print("stopping: no new connections; the requests in flight finish", file=sys.stderr, flush=True)
    _stop_serving("lepton_ray")
    return 0


def _stop_on_signals() -> Any:
    """An event set by SIGTERM or SIGINT (in place of Ray's handlers and Python's KeyboardInterrupt)."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _stop_serving(app: str) -> None:
    """Delete ``app`` (each replica drains: :meth:`lepton_ray.serve.app.Replica.__del__`), Serve too when no other
    application is left on the cluster, and disconnect from Ray."""
    import ray
    from ray import serve

    serve.delete(app)
    if not serve.status().applications:
        serve.shutdown()
    ray.shutdown()


def _check_serve_options(cfg: ServeConfig) -> None:
    """What only the machine can tell: the token's variable is set, the port is free."""
    import os
    import socket

    from lepton_ray.config import ConfigError

    if cfg.auth_token_env and not os.environ.get(cfg.auth_token_env):
        raise ConfigError(f"--auth-token-env: environment variable {cfg.auth_token_env} is not set (or empty); export the token in it first")
    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as sock:
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise ConfigError(f"--port: {cfg.host}:{cfg.port} is not free ({exc.strerror}); pick another port") from None


def _predict(args: argparse.Namespace) -> int:
    from lepton_ray.serve.batch_predict import predict

    out = predict(args.bundle, args.input, args.output, id_column=args.id_column, batch_size=args.batch_size,
                  concurrency=args.concurrency, verbose=args.verbose)
    print(f"wrote {out['rows']} predictions to {out['output']}")
    return 0


def _clean(handler: Any) -> Any:
    """A bad bundle or checkpoint is a one-line error and exit status 2 (as a config error), not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from lepton_ray.serve.bundle import BundleError

        try:
            return handler(args)
        except BundleError as exc:
            print(f"lepton-ray: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(sub: Any) -> None:
    """Add the serving subcommands to the ``lepton-ray`` parser; each sets ``handler``."""
    o = sub.add_parser("optimize", help="time fp32/bf16/int8/compile forms of a checkpoint, keep the fastest one as good as fp32")
    o.add_argument("checkpoint", help="checkpoint URI (.../step_NNNNNNNN, or a checkpoint root for its newest)")
    o.add_argument("--eval", required=True, help="held-out Parquet data with the model's input and target columns")
    o.add_argument("--output", "-o", default=None, help="where to write the serving bundle (local path or URI)")
    o.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="quality allowed below fp32: accuracy points, or percent more bits/byte, mse or loss (default 0.5)")
    o.add_argument("--candidates", nargs="+", default=None, help="forms to try (default: fp32 bf16 int8 compile)")
    o.add_argument("--bench-batch-size", type=int, default=None, help="batch size the forms are timed at (default 32)")
    o.add_argument("--threads", dest="threads_per_replica", type=int, default=None, help="torch threads (default 1)")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.set_defaults(handler=_clean(_optimize))

    s = sub.add_parser("serve", help="serve a bundle (or checkpoint) over HTTP with Ray Serve, one URL for every replica; "
                       "SIGTERM or Ctrl-C drains it and exits 0")
    s.add_argument("bundle", help="serving bundle or checkpoint URI")
    s.add_argument("--name", default=None, help="the model's name in the v2 protocol, /v2/models/NAME "
                   "(default: the bundle's name, i.e. the training run's)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    s.add_argument("--host", default=None, help="IP address to bind (default 127.0.0.1, this machine only); another one, "
                   "e.g. 0.0.0.0 for every interface, needs --auth-token-env")
    s.add_argument("--replicas", type=int, default=None, help="Serve replicas (default 1)")
    s.add_argument("--max-batch-size", type=int, default=None, help="requests per model call (default 32)")
    s.add_argument("--batch-wait-ms", type=float, default=None,
                   help="under load, the longest a batch waits to fill (default 2); a lone request never waits")
    s.add_argument("--max-instances", type=int, default=None, help="most rows per request (default 1024)")
    s.add_argument("--threads", dest="threads_per_replica", type=int, default=None, help="torch threads per replica")
    s.add_argument("--auth-token-env", default=None, metavar="NAME",
                   help="require 'Authorization: Bearer $NAME' on every endpoint but /healthz and /livez")
    s.add_argument("--json", action="store_true", help="print the URL (and the endpoints) as one JSON line once serving")
    s.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    s.set_defaults(handler=_clean(_serve))

    p = sub.add_parser("predict", help="batch prediction over Parquet with Ray Data")
    p.add_argument("bundle", help="serving bundle or checkpoint URI")
    p.add_argument("--input", required=True, help="Parquet file or directory (any URI)")
    p.add_argument("--output", required=True, help="output directory for the prediction Parquet files (any URI)")
    p.add_argument("--id-column", default="id", help="input column copied next to each prediction (default: id)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per model call")
    p.add_argument("--concurrency", type=int, default=1, help="model actors")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(handler=_clean(_predict))
