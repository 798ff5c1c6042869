"""``lepton-ray``: parse the command line, build the config, call the API. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from lepton_ray.config import ConfigError, load_config
from lepton_ray.console import quiet_ray_env

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lepton-ray", description="Distributed PyTorch training on Ray from one YAML config.")
    sub = p.add_subparsers(dest="command", required=True)
    from lepton_ray.serve.cli import VERBOSE_HELP, add_commands as add_serve_commands  # optimize, serve, predict

    add_serve_commands(sub)
    t = sub.add_parser("train", help="train a model as the config says")
    t.add_argument("config", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=0.05")
    t.add_argument("--resume", action="store_true", help="continue run.name from its newest committed checkpoint")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line of stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--local", action="store_true", help="one worker in this process, without Ray (for debugging; scaling.num_workers: 1)")
    t.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    w = sub.add_parser("sweep", help="search the config's sweep.space (lr, batch size, ...) on Ray Tune")
    w.add_argument("config", help="YAML config file with a sweep: section")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set sweep.num_samples=16")
    w.add_argument("--resume", action="store_true", help="continue the sweep (re-running the same command does too; this insists it exists)")
    w.add_argument("--json", action="store_true", help="print the best trial as one JSON object on the last line of stdout")
    w.add_argument("--no-progress", action="store_true", help="no progress bar or trials table while it runs")
    w.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    pr = d.add_parser("prepare", help="write Parquet/CSV rows as N Parquet shards plus a committed _manifest.json")
    pr.add_argument("src", help="local Parquet or CSV file or directory")
    pr.add_argument("dest", help="destination directory or URI (s3://bucket/prefix)")
    pr.add_argument("--num-shards", type=int, required=True)
    pr.add_argument("--row-group-rows", type=int, default=65536)
    pr.add_argument("--compression", default="zstd")
    pr.add_argument("--eval-fraction", type=float, default=0.0, help="split into DEST/train and DEST/eval")
    pr.add_argument("--seed", type=int, default=0, help="seed of the row shuffle before sharding")
    pr.add_argument("--no-shuffle", action="store_true", help="keep the source's row order")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("bench", add_help=False, help="run the benchmark suite of a source checkout (python -m benchmarks; "
                   "lepton-ray bench --help lists the parts)")
    r = sub.add_parser("report", help="draw a run's metrics.jsonl as PNG figures (loss, eval, throughput, time per phase)")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/digits")
    r.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default: RUN_DIR/report)")
    return p


def _report(args: argparse.Namespace) -> int:
    from lepton_ray.report import ReportError, report

    try:
        paths = report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"lepton-ray report: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _bench(argv: list[str]) -> int:
    """Delegate to the benchmark suite, ``benchmarks/`` beside this package in a source checkout."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "suite.py").is_file():
        print(f"lepton-ray bench: no benchmarks/ beside {repo / 'lepton_ray'}: the suite ships with the source checkout, "
              "not with the installed package", file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    from benchmarks.suite import main as bench_main

    return bench_main(argv, prog="lepton-ray bench")


def _prepare(args: argparse.Namespace) -> int:
    from lepton_ray.data.prepare import prepare

    out = prepare(args.src, args.dest, num_shards=args.num_shards, row_group_rows=args.row_group_rows,
                  compression=args.compression, eval_fraction=args.eval_fraction, seed=args.seed, shuffle=not args.no_shuffle,
                  progress=not args.no_progress)
    for split, manifest in out.items():
        print(f"{split}: {manifest['num_rows']} rows in {len(manifest['shards'])} shards")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from lepton_ray.tune import sweep

    cfg = load_config(args.config, args.overrides)
    result = sweep(cfg, resume=True if args.resume else None, progress=not args.no_progress, verbose=args.verbose)
    best = result.best
    if best is not None:
        print(f"best trial: {best['trial']}  {result.metric}={best[result.metric]:.4f}  "
              + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
        print(f"best checkpoint: {best['checkpoint']}")
    print(f"results: {result.files['csv']}  plot: {result.files['plot']}  best: {result.files['best']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result.to_dict(), default=str))
    if best is None:
        print(f"lepton-ray: no trial of sweep '{result.dir}' reported {result.metric}; see the trial logs above", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from lepton_ray.train import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, resume=args.resume, progress=not args.no_progress, verbose=args.verbose).fit(local=args.local)
    out = result.to_dict()
    shown = {k: v for k, v in out.items() if k.startswith("eval_") or k in ("train_loss", "steps", "samples_per_s")}
    print("result: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if "eval_bits_per_byte" in out:
        baseline = out.get("eval_unigram_bits_per_byte")
        print(f"held-out bits per byte: {out['eval_bits_per_byte']:.4f}" + (f" (unigram baseline {baseline:.4f})" if baseline else ""))
    elif "eval_accuracy" in out:
        print(f"held-out accuracy: {out['eval_accuracy']:.4f}")
    breakdown = result.breakdown()
    if breakdown:
        print("step time per rank, seconds (share):\n" + breakdown)
    print(f"checkpoint: {out['checkpoint']}")
    print(f"run directory: {out['run_dir']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(out))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_ray_env("--verbose" in argv)  # before anything imports Ray (building the parser does): Ray reads it then
    if argv[:1] == ["bench"]:  # the suite parses its own arguments (NAME ..., --quick, --update, --help)
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:  # subcommands that bring their own handler
            return args.handler(args)
        if args.command == "train":
            return _train(args)
        if args.command == "data" and args.data_command == "prepare":
            return _prepare(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
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
