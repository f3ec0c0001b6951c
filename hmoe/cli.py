r"""The command line: ``hmoe train | eval | predict | analyze | export | serve`` (also
``python -m hmoe``).

    hmoe train                                   # the synthetic default, into runs/<name>-<time>
    hmoe train --config configs/quickstart.yaml --out runs/quick --train.lr=1e-3
    hmoe train --out runs/quick --resume         # continue a killed run from its checkpoint
    hmoe train --config quickstart --nproc 2     # 2 ranks: tables sharded by TorchRec
    hmoe train --init-from runs/day1 --out runs/day2 --data.time_range=[86400,172800]
                                                 # a warm start: continue a model on new data
    hmoe plan --vocab-sizes criteo_1tb --world-size 64 --device-memory 80GB
    hmoe eval runs/quick [--split test] [--checkpoint best|last]
    hmoe predict runs/quick [--split test] [--output scores.csv]
    hmoe analyze runs/quick [--out DIR]          # figures + report.html (default RUN_DIR/report)
    hmoe export runs/quick --out models/quick    # an inference artifact (torch.export, AOTInductor)
    hmoe serve models/quick --port 8000          # the HTTP prediction service (hmoe[serve])
    hmoe generate --rows 50000000 --out DIR      # a synthetic world on disk, chunk by chunk
    hmoe configs [--kind dataset|run]            # the shipped configs' names and descriptions
    hmoe datasets                                # the same for the dataset configs only

Overrides are dotted ``section.key=value`` pairs (with or without a leading ``--``); values are
YAML (``--model.options.dim=32``, ``--loss.tasks.click.kind=bce``). Errors in the config or the
data are reported as one line naming the key, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

ANALYSIS_ROWS = 50_000  # the test rows the report analyses (held in memory)


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
    train.add_argument("--init-from", metavar="RUN_DIR",
                       help="a warm start: begin from the last checkpoint of this run (model, "
                            "optimizer state, dynamic vocabularies) on data of the same schema")
    train.add_argument("--nproc", type=int, default=None,
                       help="train on this many processes of this machine (torchrun; the "
                            "distributed extra): embedding tables sharded by TorchRec "
                            "(train.sharding), the rest data parallel")

    plan = commands.add_parser(
        "plan", help="how TorchRec would shard the embedding tables on a cluster, and the cost",
        description="TorchRec's sharding plan for the embedding tables of a schema on "
                    "--world-size devices: per table its sharding, per rank the memory of its "
                    "shards, per step the all-to-all bytes (hmoe.distributed.plan; the "
                    "distributed extra). Nothing is allocated: the tables are made on the meta "
                    "device.")
    tables = plan.add_mutually_exclusive_group(required=True)
    tables.add_argument("--vocab-sizes", help="comma-separated vocabulary sizes of categorical "
                                              "fields C1.., or criteo_1tb (26 fields, up to 4e7 "
                                              "rows)")
    tables.add_argument("--schema", help="a schema YAML with vocabulary sizes (a run's "
                                         "schema.yaml)")
    plan.add_argument("--world-size", type=int, required=True, help="devices (ranks)")
    plan.add_argument("--device-memory", default="80GB", help="memory per device (80GB, 64GiB)")
    plan.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    plan.add_argument("--batch-size", type=int, default=65536, help="the global batch")
    plan.add_argument("--num-sets", type=int, default=4, help="K, embedding sets")
    plan.add_argument("--dim", type=int, default=16, help="D, each set's dim")
    plan.add_argument("--sharding", default="auto")
    plan.add_argument("--optimizer", default="rowwise_adagrad", choices=("rowwise_adagrad", "sgd"))

    for name, text in (("eval", "evaluate a run's model on a split"),
                       ("predict", "write a run's scores for a split")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("run_dir", help="the run directory")
        command.add_argument("--split", default="test", choices=("train", "valid", "test"))
        command.add_argument("--checkpoint", default="best",
                             help="best, last, a .pt checkpoint or a .dcp directory (a run on "
                                  "several ranks) (default: best)")
        if name == "predict":
            command.add_argument("--output", help="a .csv or .parquet file (default: "
                                                  "RUN_DIR/predictions_<split>.csv)")
            command.add_argument("--raw", action="store_true",
                                 help="the model's scores as they are, not calibrated by the "
                                      "run's calibration.json")

    analyze = commands.add_parser("analyze", help="figures and a report of a trained run",
                                  description="Dimensional collapse, behaviour-target "
                                              "correlation and interest entanglement of a run.")
    analyze.add_argument("run_dir", help="the run directory")
    analyze.add_argument("--out", help="the report directory (default: RUN_DIR/report)")
    analyze.add_argument("--checkpoint", default="best",
                         help="best, last, a .pt file or a .dcp directory")

    export = commands.add_parser(
        "export", help="write a run's inference artifact (torch.export, AOTInductor)",
        description="Export a trained run for serving: the torch.export program, an "
                    "AOTInductor package per device, the preprocessing (schema, vocabularies, "
                    "id maps) and the calibration (hmoe.serving.artifact documents the files). "
                    "The eager model, the program and each package must agree within 1e-5 on "
                    "random rows, or the export fails.")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("--out", required=True, help="the artifact directory (new)")
    export.add_argument("--checkpoint", default="best",
                        help="best, last, a .pt file or a .dcp directory (default: best)")
    export.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="compile an AOTInductor package for this device (repeatable; "
                             "default: cpu)")
    export.add_argument("--no-aoti", action="store_true",
                        help="no AOTInductor package (the exported program only)")
    export.add_argument("--cache", help="the run's preprocessing cache, when it is not where "
                                        "the run's config says (runs on raw files)")
    export.add_argument("--raw", action="store_true", help="leave the calibration out")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    serve = commands.add_parser(
        "serve", help="serve an exported model over HTTP (the extra hmoe[serve])",
        description="POST /predict {\"rows\": [{column: raw value}]} -> {\"predictions\": "
                    "[{task: score}]}; GET /health, /metadata. Requests are joined into "
                    "batches of up to --max-batch rows (hmoe.serving.server).")
    serve.add_argument("artifact", help="an artifact directory written by hmoe export")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--mode", default="auto", choices=("auto", "aoti", "exported", "eager"),
                       help="what scores: the AOTInductor package, the exported program or "
                            "the eager model (auto: aoti when the artifact has one)")
    serve.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    serve.add_argument("--max-batch", type=int, default=256, help="rows scored at once")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="how long a request waits for others to join its batch")
    serve.add_argument("--max-request-rows", type=int, default=4096)
    serve.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    serve.add_argument("--raw", action="store_true", help="uncalibrated scores")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))

    generate = commands.add_parser(
        "generate", help="write a synthetic world to disk in bounded memory",
        description="Generate the synthetic ads world chunk by chunk into a directory (train / "
                    "valid / test Parquet files, schema, config, planted ground truth) for "
                    "--data.source=world --data.world=DIR. Extra --key=value arguments set "
                    "other hmoe.data.SyntheticConfig fields (e.g. --num_users=100000).")
    generate.add_argument("--rows", type=int, required=True, help="rows of all splits together")
    generate.add_argument("--out", required=True, help="the directory (new or empty)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--row-group-rows", type=int, default=None,
                          help="rows per Parquet row group (the stream's unit)")

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


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _train(args, overrides: list[str], argv: list[str]) -> int:
    from hmoe.distributed.launch import world_size_from_env
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
    ranks = world_size_from_env()
    if args.nproc is not None and ranks == 1:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:  # this process becomes torchrun, which starts the ranks
            from hmoe.distributed.launch import launch

            children = _without_nproc(argv) + ([] if args.out else ["--out", str(out)])
            print(f"hmoe train: run directory {out}, {args.nproc} ranks", flush=True)
            return launch(args.nproc, children)
    main = True
    if ranks > 1:  # under torchrun: one run directory for all ranks, rank 0 speaks
        from hmoe.distributed.launch import broadcast, init_ranks

        main = init_ranks().main
        out = broadcast(out)
    if main:
        print(f"hmoe train: run directory {out}", flush=True)
    start = time.perf_counter()
    results = Trainer(config, out, resume=args.resume, init_from=args.init_from).fit()
    if ranks > 1:  # (after a failure the job fails anyway, and a dead rank would block)
        from hmoe.distributed.launch import close_ranks

        close_ranks()
    if not main:
        return 0
    took = f"trained {results['steps']} steps in {time.perf_counter() - start:.1f} s"
    if results.get("mode") == "online":
        print(f"{took}, online over {results['windows']} windows (their progressive metrics: "
              f"the 'window' records of metrics.jsonl)")
    else:
        print(f"{took}; best {results['monitor']} = {results['best']} at step "
              f"{results['best_step']}")
    _print_metrics("test metrics (best checkpoint):", results["test"])
    if "test_calibrated" in results:
        _print_metrics("test metrics, calibrated on valid:", results["test_calibrated"])
    print(f"results: {out / 'results.json'}  metrics log: {out / 'metrics.jsonl'}")
    return 0


def _plan(args) -> int:
    from hmoe.data.schema import load_schema
    from hmoe.distributed.plan import (
        CRITEO_1TB_VOCAB_SIZES,
        categorical_schema,
        parse_bytes,
        plan_tables,
    )

    if args.schema:
        schema = load_schema(args.schema)
        if any(f.vocab_size is None for f in schema.categorical):
            raise ValueError(f"{args.schema}: every categorical field needs its vocab_size "
                             f"(a run's schema.yaml has them)")
    elif args.vocab_sizes.strip().lower() == "criteo_1tb":
        schema = categorical_schema(CRITEO_1TB_VOCAB_SIZES, "criteo_1tb")
    else:
        try:
            sizes = [int(v) for v in args.vocab_sizes.split(",")]
        except ValueError:
            raise ValueError(f"--vocab-sizes: expected integers separated by commas or "
                             f"criteo_1tb, got {args.vocab_sizes!r}") from None
        schema = categorical_schema(sizes)
    plan = plan_tables(schema, args.num_sets, args.dim, world_size=args.world_size,
                       device_memory=parse_bytes(args.device_memory),
                       batch_size=args.batch_size, compute_device=args.device,
                       sharding=args.sharding, optimizer=args.optimizer)
    print(f"{schema.name}: {len(schema.categorical)} tables, K = {args.num_sets} sets of "
          f"D = {args.dim}, {args.world_size} x {args.device} ({args.device_memory}), global "
          f"batch {args.batch_size:,d}, {args.optimizer}")
    print(plan.report())
    return 0 if plan.fits() else 1


def _eval(args) -> int:
    from hmoe.train.trainer import _atomic_write_text, _jsonable, evaluate_model, load_run

    run = load_run(args.run_dir, args.checkpoint)
    metrics = evaluate_model(run.model, run.dataset.source(args.split),
                             run.config.train.eval_batch_size,
                             metrics=run.config.train.metric_options())
    _print_metrics(f"{args.split} metrics ({run.checkpoint}):", metrics)
    tag = Path(args.checkpoint).stem
    written = {Path(args.run_dir) / f"eval_{args.split}_{tag}.json": metrics}
    if run.calibration is not None:
        calibrated = evaluate_model(run.model, run.dataset.source(args.split),
                                    run.config.train.eval_batch_size,
                                    metrics=run.config.train.metric_options(),
                                    calibration=run.calibration)
        _print_metrics(f"{args.split} metrics, calibrated (calibration.json):", calibrated)
        written[Path(args.run_dir) / f"eval_{args.split}_{tag}_calibrated.json"] = calibrated
    for path, values in written.items():
        _atomic_write_text(path, json.dumps(_jsonable(values), indent=2) + "\n")
        print(f"written: {path}")
    return 0


def _predict(args) -> int:
    """Scores a batch at a time into the output file: any split size in bounded memory."""
    import numpy as np
    import pyarrow as pa

    from hmoe.train.trainer import iter_predictions, load_run

    run = load_run(args.run_dir, args.checkpoint)
    output = Path(args.output) if args.output else \
        Path(args.run_dir) / f"predictions_{args.split}.csv"
    rows, columns = 0, []
    with _TableWriter(output) as writer:
        calibration = None if args.raw else run.calibration
        for batch, scores in iter_predictions(run.model, run.dataset.source(args.split),
                                              run.config.train.eval_batch_size,
                                              calibration=calibration):
            n = len(batch["labels"])
            table = {"row": np.arange(rows, rows + n, dtype=np.int64)}
            if "group_id" in batch:
                table["group_id"] = batch["group_id"].numpy()
            table.update((f"score_{task}", values) for task, values in scores.items())
            writer.write(pa.table(table))
            rows += n
            columns = list(table)
    print(f"written: {output} ({rows} rows; columns {columns})")
    return 0


class _TableWriter:
    """CSV or Parquet by suffix, appended a table at a time under a temporary name and renamed
    when complete."""

    def __init__(self, output: Path):
        if output.suffix not in (".csv", ".parquet"):
            raise ValueError(f"--output must end in .csv or .parquet, got {output}")
        self.output = output
        self._tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
        self._writer = None

    def __enter__(self):
        self.output.parent.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, table) -> None:
        import pyarrow.csv
        import pyarrow.parquet

        if self._writer is None:
            kind = pyarrow.csv.CSVWriter if self.output.suffix == ".csv" \
                else pyarrow.parquet.ParquetWriter
            self._writer = kind(self._tmp, table.schema)
        self._writer.write_table(table)

    def __exit__(self, kind, error, traceback) -> None:
        if self._writer is not None:
            self._writer.close()
        if error is None:
            os.replace(self._tmp, self.output)
        else:
            self._tmp.unlink(missing_ok=True)


def _export(args) -> int:
    from hmoe.serving import export

    devices = () if args.no_aoti else tuple(dict.fromkeys(args.device or ["cpu"]))
    if args.no_aoti and args.device:
        raise ValueError("--no-aoti and --device: choose one")
    started = time.perf_counter()
    manifest = export(args.run_dir, args.out, checkpoint=args.checkpoint, cache=args.cache,
                      devices=devices, calibrate=not args.raw, overwrite=args.overwrite)
    differences = manifest["check"]["max_abs_logit_difference"]
    print(f"exported {manifest['checkpoint']} (model version {manifest['model_version']}, tasks "
          f"{manifest['tasks']}) to {args.out} in {time.perf_counter() - started:.0f} s")
    print(f"agreement with the eager model on {manifest['check']['rows']} rows (largest logit "
          f"difference): " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    return 0


def _serve(args) -> int:
    from hmoe.serving.server import BatchSettings, serve

    settings = BatchSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_request_rows=args.max_request_rows)
    try:
        serve(args.artifact, host=args.host, port=args.port, mode=args.mode, device=args.device,
              calibrated=not args.raw, settings=settings, threads=args.threads,
              log_level=args.log_level)
    except RuntimeError as error:  # the extra is missing
        print(f"hmoe serve: error: {error}", file=sys.stderr)
        return 2
    return 0


def _analyze(args) -> int:
    from hmoe.analysis import analyze
    from hmoe.train.trainer import load_run, load_snapshots, read_metrics

    run = load_run(args.run_dir, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    records = read_metrics(Path(args.run_dir) / "metrics.jsonl")
    gradients = [r for r in records if r.get("kind") == "grad_cosine"]
    windows = [r for r in records if r.get("kind") == "window"]
    test = run.dataset.source("test").columns(max_rows=ANALYSIS_ROWS)
    analyze(run.model, run.dataset.schema, test,
            ground_truth=run.dataset.ground_truth, gradient_history=gradients or None,
            out_dir=out, snapshots=load_snapshots(args.run_dir) or None,
            windows=windows or None)
    print(f"report: {out / 'report.html'}  numbers: {out / 'report.json'}")
    return 0


def _generate(args, extra: list[str]) -> int:
    import dataclasses

    import yaml

    from hmoe.data.synthetic import SyntheticConfig, write_world

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    options = {}
    for arg in extra:
        key, sep, text = arg.removeprefix("--").partition("=")
        if not sep or key not in fields or key in ("num_rows", "seed"):
            raise ValueError(f"generate: {arg!r} is not --<field>=<value> of a SyntheticConfig "
                             f"field; fields: {sorted(fields - {'num_rows', 'seed'})}")
        options[key] = yaml.safe_load(text)
    try:
        config = SyntheticConfig(num_rows=args.rows, seed=args.seed, **options)
    except TypeError as error:
        raise ValueError(f"generate: {error}") from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    if args.row_group_rows is not None and args.row_group_rows < 1:
        raise ValueError(f"--row-group-rows must be >= 1, got {args.row_group_rows}")
    start = time.perf_counter()
    write_world(config, out, progress=sys.stderr.isatty(), row_group_rows=args.row_group_rows)
    print(f"written: {out} ({config.num_rows} rows in {time.perf_counter() - start:.1f} s); "
          f"train on it with --data.source=world --data.world={out}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "generate"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, _overrides(extra, parser), argv)
        if args.command == "generate":
            return _generate(args, extra)
        return {"eval": _eval, "predict": _predict, "analyze": _analyze, "configs": _configs,
                "datasets": _configs, "plan": _plan, "export": _export,
                "serve": _serve}[args.command](args)
    except (ValueError, FloatingPointError) as error:
        print(f"hmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
