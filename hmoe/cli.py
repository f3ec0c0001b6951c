r"""The command line: ``hmoe train | eval | predict | analyze`` (also ``python -m hmoe``).

    hmoe train                                   # the synthetic default, into runs/<name>-<time>
    hmoe train --config configs/quickstart.yaml --out runs/quick --train.lr=1e-3
    hmoe train --out runs/quick --resume         # continue a killed run from its checkpoint
    hmoe eval runs/quick [--split test] [--checkpoint best|last]
    hmoe predict runs/quick [--split test] [--output scores.csv]
    hmoe analyze runs/quick [--out DIR]          # figures + report.html (default RUN_DIR/report)
    hmoe configs [--kind dataset|run]            # the shipped configs' names and descriptions
    hmoe datasets                                # the same for the dataset configs only

Overrides are dotted ``section.key=value`` pairs (with or without a leading ``--``); values are
YAML (``--model.options.dim=32``, ``--loss.tasks.click.kind=bce``). Errors in the config or the
data are reported as one line naming the key, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmoe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model into a run directory",
                                description="Train the model of a run config. Extra arguments "
                                            "section.key=value override the config.")
    train.add_argument("--config", help="the run config: a YAML file or a shipped name such as "
                                        "quickstart (default: the synthetic default)")
    train.add_argument("--out", help="the run directory (default: runs/<config name>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")

    for name, text in (("eval", "evaluate a run's model on a split"),
                       ("predict", "write a run's scores for a split")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("run_dir", help="the run directory")
        command.add_argument("--split", default="test", choices=("train", "valid", "test"))
        command.add_argument("--checkpoint", default="best",
                             help="best, last, or a path to a .pt checkpoint (default: best)")
        if name == "predict":
            command.add_argument("--output", help="a .csv or .parquet file (default: "
                                                  "RUN_DIR/predictions_<split>.csv)")

    analyze = commands.add_parser("analyze", help="figures and a report of a trained run",
                                  description="Dimensional collapse, behaviour-target "
                                              "correlation and interest entanglement of a run.")
    analyze.add_argument("run_dir", help="the run directory")
    analyze.add_argument("--out", help="the report directory (default: RUN_DIR/report)")
    analyze.add_argument("--checkpoint", default="best", help="best, last or a .pt path")

    listing = commands.add_parser("configs", help="list the shipped configs",
                                  description="The dataset configs (--data.dataset=NAME) and run "
                                              "configs (--config NAME) installed with hmoe.")
    listing.add_argument("--kind", choices=("dataset", "run"), help="only this kind")
    commands.add_parser("datasets", help="list the shipped dataset configs",
                        description="The dataset configs installed with hmoe "
                                    "(--data.dataset=NAME), with their descriptions.")
    return parser


def _overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    overrides = []
    for arg in extra:
        key = arg.removeprefix("--")
        if "=" not in key or "." not in key.partition("=")[0]:
            parser.error(f"unrecognized argument {arg!r}: overrides look like "
                         f"--section.key=value (e.g. --train.lr=1e-3)")
        overrides.append(key)
    return overrides


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    print(f"  {'task':<12} {'auc':>7} {'gauc':>7} {'logloss':>8} {'ne':>7} {'calib':>7}")
    for task, m in metrics.items():
        def fmt(key, width=7):
            value = m.get(key)
            return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
        print(f"  {task:<12} {fmt('auc')} {fmt('gauc')} {fmt('logloss', 8)} {fmt('ne')} "
              f"{fmt('calibration')}")


def _train(args, overrides: list[str]) -> int:
    from hmoe.train.config import load_run_config
    from hmoe.train.trainer import Trainer

    config = load_run_config(args.config, overrides)
    if args.out is None:
        if args.resume:
            raise ValueError("--resume needs --out, the run directory to continue")
        name = Path(args.config).stem if args.config else "synthetic"
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        out = Path(args.out)
    print(f"hmoe train: run directory {out}", flush=True)
    start = time.perf_counter()
    results = Trainer(config, out, resume=args.resume).fit()
    print(f"trained {results['steps']} steps in {time.perf_counter() - start:.1f} s; best "
          f"{results['monitor']} = {results['best']} at step {results['best_step']}")
    _print_metrics("test metrics (best checkpoint):", results["test"])
    print(f"results: {out / 'results.json'}  metrics log: {out / 'metrics.jsonl'}")
    return 0


def _eval(args) -> int:
    from hmoe.train.trainer import _atomic_write_text, _jsonable, evaluate_model, load_run

    run = load_run(args.run_dir, args.checkpoint)
    metrics = evaluate_model(run.model, run.dataset.splits[args.split],
                             run.config.train.eval_batch_size)
    _print_metrics(f"{args.split} metrics ({run.checkpoint}):", metrics)
    tag = Path(args.checkpoint).stem
    path = Path(args.run_dir) / f"eval_{args.split}_{tag}.json"
    _atomic_write_text(path, json.dumps(_jsonable(metrics), indent=2) + "\n")
    print(f"written: {path}")
    return 0


def _predict(args) -> int:
    import numpy as np
    import pyarrow as pa

    from hmoe.train.trainer import load_run, predict_scores

    run = load_run(args.run_dir, args.checkpoint)
    columns = run.dataset.splits[args.split]
    scores = predict_scores(run.model, columns, run.config.train.eval_batch_size)
    table = {"row": np.arange(len(columns["labels"]), dtype=np.int64)}
    if "group_id" in columns:
        table["group_id"] = np.asarray(columns["group_id"])
    table.update((f"score_{task}", values) for task, values in scores.items())
    output = Path(args.output) if args.output else \
        Path(args.run_dir) / f"predictions_{args.split}.csv"
    _write_table(pa.table(table), output)
    print(f"written: {output} ({len(table['row'])} rows; columns {list(table)})")
    return 0


def _write_table(table, output: Path) -> None:
    """CSV or Parquet by suffix, written to a temporary name and renamed."""
    import os

    import pyarrow.csv
    import pyarrow.parquet

    if output.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--output must end in .csv or .parquet, got {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    if output.suffix == ".csv":
        pyarrow.csv.write_csv(table, tmp)
    else:
        pyarrow.parquet.write_table(table, tmp)
    os.replace(tmp, output)


def _analyze(args) -> int:
    from hmoe.analysis import analyze
    from hmoe.train.trainer import load_run, load_snapshots, read_metrics

    run = load_run(args.run_dir, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    gradients = [r for r in read_metrics(Path(args.run_dir) / "metrics.jsonl")
                 if r.get("kind") == "grad_cosine"]
    analyze(run.model, run.dataset.schema, run.dataset.splits["test"],
            ground_truth=run.dataset.ground_truth, gradient_history=gradients or None,
            out_dir=out, snapshots=load_snapshots(args.run_dir) or None)
    print(f"report: {out / 'report.html'}  numbers: {out / 'report.json'}")
    return 0


def _configs(args) -> int:
    from hmoe import configs

    kinds = [args.kind] if getattr(args, "kind", None) else ["dataset", "run"]
    if args.command == "datasets":
        kinds = ["dataset"]
    usage = {"dataset": "dataset configs (--data.dataset=NAME)",
             "run": "run configs (hmoe train --config NAME)"}
    for i, kind in enumerate(kinds):
        names = configs.names(kind)
        print(("\n" if i else "") + usage[kind] + ":")
        width = max(map(len, names), default=0)
        for name in names:
            print(f"  {name:<{width}}  {configs.describe(kind, name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, _overrides(extra, parser))
        return {"eval": _eval, "predict": _predict, "analyze": _analyze, "configs": _configs,
                "datasets": _configs}[args.command](args)
    except (ValueError, FloatingPointError) as error:
        print(f"hmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
