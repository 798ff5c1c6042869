"""``lepton-ray``: parse the command line, build the config, call the API. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from lepton_ray.config import ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lepton-ray", description="Distributed PyTorch training on Ray from one YAML config.")
    sub = p.add_subparsers(dest="command", required=True)
    from lepton_ray.serve.cli import add_commands as add_serve_commands  # optimize, serve, predict

    add_serve_commands(sub)
    t = sub.add_parser("train", help="train a model as the config says")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=0.05")
    t.add_argument("--resume", action="store_true", help="continue run.name from its newest committed checkpoint")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line of stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _train(args: argparse.Namespace) -> int:
    from lepton_ray.train import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    out = result.to_dict()
    shown = {k: v for k, v in out.items() if k.startswith("eval_") or k in ("train_loss", "steps", "samples_per_s")}
    print("result: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if "eval_accuracy" in out:
        print(f"held-out accuracy: {out['eval_accuracy']:.4f}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"run directory: {out['run_dir']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(out))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:  # subcommands that bring their own handler
            return args.handler(args)
        if args.command == "train":
            return _train(args)
    except ConfigError as exc:
        print(f"lepton-ray: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from lepton_ray.train import TrainingError

        if isinstance(exc, TrainingError):
            print(f"lepton-ray: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
