r"""Runs the experiments that check the paper's claims and writes docs/RESULTS.md.

    python experiments/run.py                         # all, seeds 0,1,2 (tens of minutes, 2 cores)
    python experiments/run.py --only numerics,ipw --seeds 0,1,2,3,4
    python experiments/run.py --rows 20000 --seeds 0,1 --out /tmp/results.md   # a smoke run
    python experiments/run.py --only online --update  # rerun one, keep the page's others
    python experiments/run.py --quick --out /tmp/r.md # the smoke test's sizes (CI)

Finished runs are cached (experiments/common.py, .cache/experiments/runs/): a rerun trains only
the runs whose settings or data changed; ``--fresh`` retrains everything.

Each experiment module (experiments/<name>.py) has ``run(dataset, seeds, log) -> Section``;
this script runs the chosen ones on the synthetic ads world and, where a module supports it,
on the real datasets found in $HMOE_DATA_DIR or ../shared/data (skipped when absent), then
writes the page (markdown tables, figures under docs/figures/) and every number as JSON
(docs/results.json). Nothing is edited by hand: rerun to regenerate.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import real  # noqa: E402

EXPERIMENTS = ("peers", "multi_embedding", "sequence", "numerics", "multitask", "ranking_loss",
               "ipw", "heterogeneous", "online", "dose_response", "scale")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(EXPERIMENTS),
                        help=f"comma-separated experiments (default: all of {EXPERIMENTS})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--rows", type=int, default=150_000,
                        help="rows of the synthetic world (default 150000)")
    parser.add_argument("--out", default=str(common.ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--no-real", dest="real", action="store_false",
                        help="synthetic world only (skip the real datasets)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: 3000 rows, seeds 0,1, no real datasets, the "
                             "sweeps' two weakest levels and one epoch")
    parser.add_argument("--no-synthetic", dest="synthetic", action="store_false",
                        help="only the real datasets' parts (the peer table and each "
                             "experiment's real datasets); with --update the page keeps its "
                             "synthetic sections")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every run instead of reading cached ones")
    parser.add_argument("--update", action="store_true",
                        help="replace (or add) only the sections of the experiments run, in "
                             "the existing page and its JSON, and record the command there")
    args = parser.parse_args(argv)
    args.only = [e for e in args.only.split(",") if e]
    unknown = sorted(set(args.only) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    if args.quick:
        args.rows, args.seeds, args.real = 3000, "0,1", False
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if len(args.seeds) < 2:
        parser.error("need at least 2 seeds for a spread (3 or more for the published page)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    figures = out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(common.THREADS)
    common.USE_CACHE = not args.fresh
    common.QUICK = args.quick
    start, sections, skipped = time.perf_counter(), [], []
    synthetic = common.synthetic(args.rows)
    for name in args.only:
        module = importlib.import_module(name)
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        accepts = inspect.signature(module.run).parameters
        kwargs = {"figures": figures} if "figures" in accepts else {}
        if "real" in accepts:  # (peers: real data only)
            kwargs["real"] = args.real
        own = {"rows": args.rows, "quick": args.quick}  # (dose_response, scale: own worlds)
        if args.synthetic or name == "peers":
            ledger = dict(common.LEDGER)
            sections.append(module.run(synthetic, args.seeds, **kwargs,
                                       **{k: v for k, v in own.items() if k in accepts}))
            _cost(sections[-1], ledger, getattr(module, "BUDGET", None))
        for dataset_name, options in getattr(module, "REAL", []) if args.real else []:
            dataset = real.load(dataset_name)
            if dataset is None:
                print(f"   {dataset_name}: not found (see experiments/real.py), skipped")
                skipped.append(f"{name} on {dataset_name}")
                continue
            print(f"== {name} on {dataset_name}", flush=True)
            ledger = dict(common.LEDGER)
            sections.append(module.run(dataset, args.seeds, label=dataset_name, **options,
                                       **kwargs))
            _cost(sections[-1], ledger, getattr(module, "BUDGET", None))
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    command = "python experiments/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        "# Results: the paper's claims, checked",
        "",
        "Generated by `experiments/run.py`; do not edit by hand (rerun it). Every number is the",
        "mean ± sample standard deviation over the seeds of hmoe's own trainer on a 2-core CPU;",
        "\"better\" / \"worse\" means the difference exceeds two standard errors (at 3 seeds a",
        "screen, not a proof), otherwise \"within noise\". Runs train to early stopping",
        "(experiments/common.py's BASE; the real datasets' batch sizes in experiments/real.py;",
        "sections 0, 9 and 10 state their own budget); a section whose last line does not say so",
        "is a 1-epoch screen kept from an earlier run. Each experiment's module docstring says",
        "how it is built; each section ends with what its runs cost.",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{common.THREADS} threads; total {time.perf_counter() - start:.0f} s",
        f"- seeds: {args.seeds}; synthetic world: {args.rows} rows (80/10/10 split); real "
        f"datasets: experiments/real.py"
        + (f"; skipped (files absent): {', '.join(skipped)}" if skipped else ""),
        "",
    ]
    body = []
    for section in sections:
        body += [f"## {section.title}", "", section.markdown, ""]
        body += [f"![{Path(f).stem}](figures/{Path(f).name})" for f in section.figures]
        if section.figures:
            body.append("")
    numbers = {s.title: s.numbers for s in sections}
    data = out.parent / (out.stem.lower() + ".json")
    if args.update and out.is_file():
        text, numbers = _updated(out.read_text(encoding="utf-8"), body, header,
                                 json.loads(data.read_text()) if data.is_file() else {},
                                 numbers)
    else:
        text = "\n".join(header + body)
    out.write_text(_with_summary(text), encoding="utf-8")
    data.write_text(json.dumps(numbers, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


SUMMARY = "What holds, what does not (collected from the sections below)"

# The summary's groups: each paper claim with every section and sweep that tests it. A finding
# joins the first group with a key in its subtitle (a sweep's, or section 10's), else in its
# section title; a finding matching none is listed under "Other".
CLAIMS = (
    ("hmoe beside FuxiCTR (PEERS.md)", ("hmoe beside FuxiCTR",)),
    ("Multi-embedding vs single-embedding (notes 3.2)", ("Multi-embedding",)),
    ("TIM vs other sequence encoders (notes 2.1)", ("Behaviour sequences", "TIM")),
    ("MNSE for numeric features", ("Numeric features",)),
    ("STEM vs MMoE and other multi-task schemes (notes 4.1)", ("Multi-task embedding", "STEM")),
    ("The combined-pair ranking loss vs BCE (notes 5.1)", ("ranking loss",)),
    ("IPW for repeated exposure", ("IPW",)),
    ("Heterogeneous vs homogeneous experts", ("Heterogeneous",)),
    ("Online learning", ("Online learning",)),
)


def _claim(title: str, subtitle: str | None) -> str:
    for text in (subtitle, title):
        for heading, keys in CLAIMS:
            if text and any(key in text for key in keys):
                return heading
    return "Other"


def _with_summary(page: str) -> str:
    """The page with its summary section (first) rebuilt from the computed verdicts of its
    sections: each claim's "**Here**:" finding, each sweep's "**Verdict**:", and the peer
    table's rows for hmoe's best model and hmoe's model built like the peer's. Nothing in it
    is typed."""
    head, sections = _sections(page.split("\n"))
    sections.pop(SUMMARY, None)
    ordered = sorted(sections.items(), key=lambda item: _number(item[0]))  # (stable)
    bullets: dict[str, list[str]] = {}
    for title, lines in ordered:
        subtitle = None
        screen = "" if any("early stopping" in line for line in lines) else \
            "(1-epoch screen) "
        for line in lines:
            if line.startswith("### "):
                subtitle = line[4:].strip()
            elif line.startswith("**Here**:"):
                bullets.setdefault(_claim(title, None), []).append(
                    f"- **{title}**: {screen}{line[len('**Here**:'):].strip()}")
            elif line.startswith("**Verdict**:"):
                bullets.setdefault(_claim(title, subtitle), []).append(
                    f"- **{title}, {subtitle}**: {line[len('**Verdict**:'):].strip()}")
            elif line.startswith("|") and "| **hmoe's " in line:
                cells = [c.strip() for c in line.strip("|").split("|")]
                dataset, task, model, auc, verdict = cells[0], cells[1], cells[2], cells[3], \
                    cells[-1]
                bullets.setdefault(_claim(title, None), []).append(
                    f"- **{title}**: {dataset} / {task}: {model.strip('*')} {auc}, {verdict}")
    if not bullets:
        return page
    groups = []
    for heading in [h for h, _ in CLAIMS] + ["Other"]:
        if heading in bullets:
            groups += [f"### {heading}", "", *bullets[heading], ""]
    summary = [f"## {SUMMARY}", "",
               "Each line is the computed finding of its section, copied here and grouped by "
               "the claim it tests; \"(1-epoch screen)\" marks a section not yet rerun to "
               "early stopping, where \"within noise\" means not settled rather than equal.",
               "", *groups]
    while head and not head[-1].strip():
        head.pop()
    return "\n".join(head + [""] + summary + [line for _, lines in ordered for line in lines])


def _number(title: str) -> float:
    """A section's number ("0. hmoe beside ..." -> 0); unnumbered ones go last."""
    head = title.split(".", 1)[0]
    return int(head) if head.isdigit() else math.inf


def _cpu() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _cost(section, before: dict, budget=None) -> None:
    """Appends to the section its budget and what its runs cost (training wall time on this
    machine). ``budget``: the module's BUDGET, a text, or a list of settings when the section
    states its own budget (None: experiments/common.py's)."""
    runs = common.LEDGER["runs"] - before["runs"]
    cached = common.LEDGER["cached"] - before["cached"]
    seconds = common.LEDGER["seconds"] - before["seconds"]
    if budget is None:
        budget = "1 epoch each (--quick)" if common.QUICK else common.BUDGET_TEXT
    parts = [budget] if isinstance(budget, str) else []
    if runs:
        parts.append(f"{runs} training runs, {seconds / 60:.1f} min of training on "
                     f"{os.cpu_count()} cores"
                     + (f" ({cached} read from the run cache)" if cached else ""))
        section.numbers["_cost"] = {"runs": runs, "cached": cached, "seconds": seconds}
    if parts:
        section.markdown += "\n\n*" + "; ".join(parts) + ".*"


def _sections(lines: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """A page's header lines and its sections by title (in order)."""
    head, sections, title = [], {}, None
    for line in lines:
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = [line]
        elif title is None:
            head.append(line)
        else:
            sections[title].append(line)
    return head, sections


def _updated(page: str, body: list[str], header: list[str], old_numbers: dict,
             new_numbers: dict) -> tuple[str, dict]:
    """The page with the sections in ``body`` replacing those of the same title (or added at
    the end), this run's explanatory header, the page's record of the runs behind it (its
    command, date and "updated" lines, less those whose sections are all rerun now) and a line
    recording this run's command and date."""
    old_head, sections = _sections(page.split("\n"))
    _, fresh = _sections(body)
    sections.update(fresh)
    command = next(line for line in header if line.startswith("- command:"))
    date = next(line for line in header if line.startswith("- date:"))
    record = []
    for line in old_head:
        if not line.startswith("- "):
            continue
        named = [title for title in sections if title in line]
        if line.startswith("- updated ") and named and all(t in fresh for t in named):
            continue  # superseded by this run
        record.append(line)
    head = [line for line in header if line.strip() and not line.startswith("- ")]
    head = head[:1] + [""] + head[1:] + [""] + record
    head += [f"- updated {', '.join(fresh)}: {command[2:]}; {date[2:]}", ""]
    lines = head + [line for section in sections.values() for line in section]
    return "\n".join(lines), {**old_numbers, **new_numbers}


if __name__ == "__main__":
    sys.exit(main())
