"""``python -m benchmarks [--quick] [--device cpu|cuda] [--family F ...]``: the main job.

Measures this machine's limits, then times every case of every family (dlcore vs the eager
reference vs the peer, interleaved, medians), prints a table per family and a summary, and
writes ``benchmarks/results/<device>-<date>.json`` plus a PNG plot per family.
``--update-readme`` regenerates README.md's results table from the newest JSON of each device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import glob
import importlib
import json
import math
import os
import pkgutil
import re
import statistics
import sys
import traceback

import torch

from . import harness

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")


def family_names() -> list[str]:
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_")
    )


def _fmt_time(s: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _paired_ratio(samples: dict[str, list[float]], num: str | None, den: str) -> float | None:
    return harness.paired_ratio(samples, num, den) if num in samples else None


def _over_base(r: dict) -> str:
    """dlcore's (and the peer's) time as a multiple of the case's floor, when it has one."""
    if "dlcore_over_base" not in r:
        return ""
    peer = f" ({r['peer']} {r['peer_over_base']:.2f}x)" if r.get("peer_over_base") else ""
    return f"{r['dlcore_over_base']:.2f}x{peer}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    device = torch.device(args.device)
    families = args.family or family_names()
    console.print(
        f"[bold]dlcore benchmarks[/] on {harness.device_name(device)}, torch "
        f"{torch.__version__}, {'quick' if args.quick else 'full'} run"
    )
    limits = harness.measure_limits(device, args.quick)
    console.print(
        "machine limits: "
        + ", ".join(
            f"{k.replace('_', ' ')} {v / 1e9:.1f} {'GB/s' if 'bandwidth' in k else 'GFLOP/s'}"
            for k, v in limits.items()
        )
    )

    cases: list[harness.Case] = []
    for fam in families:
        try:
            module = importlib.import_module(f"benchmarks.bench_{fam}")
        except Exception:
            console.print(f"[red]family {fam} failed to load[/]\n{traceback.format_exc()}")
            continue
        cases += [
            c for c in module.CASES if device.type in c.devices and (c.quick or not args.quick)
        ]

    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.family}: {case.name}")
            row = {
                "family": case.family,
                "case": case.name,
                "dtype": str(case.dtype),
                "peer": case.peer,
                "goal": case.goal,
            }
            try:
                fns = case.setup(device)
                samples = harness.time_interleaved_samples(
                    fns,
                    device,
                    repeats=7 if args.quick else 21,
                    sample_seconds=0.02 if args.quick else 0.05,
                    budget_seconds=4 if args.quick else 15,
                )
                del fns
                times = {name: statistics.median(s) for name, s in samples.items()}
                row["times"] = times
                t = times["dlcore"]
                # Ratios: medians of per-round ratios, robust to drift between rounds.
                ratio = functools.partial(_paired_ratio, samples)
                row["speedup_vs_eager"] = ratio("eager", "dlcore")
                row["speedup_vs_peer"] = ratio(case.peer, "dlcore")
                if "base" in times:  # the floor the op cannot beat, e.g. LoRA's plain nn.Linear
                    row["dlcore_over_base"] = ratio("dlcore", "base")
                    row["peer_over_base"] = ratio(case.peer, "base")
                frac, what = harness.fraction_of_limit(case, t, limits)
                row["fraction_of_limit"] = None if math.isnan(frac) else frac
                row["limit"] = what
                row.update(case.notes)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{case.family}/{case.name} failed:[/] {row['error']}")
            results.append(row)
            progress.advance(task)

    summary = Table(title="dlcore vs eager reference vs peer (median time per call)")
    for col in (
        "family",
        "case",
        "dlcore",
        "eager",
        "peer",
        "x eager",
        "x peer",
        "of limit",
        "over base",
        "goal",
    ):
        summary.add_column(col, overflow="fold")
    for r in results:
        if "error" in r:
            summary.add_row(r["family"], r["case"], "error", *[""] * 6, r["error"][:60])
            continue
        t = r["times"]
        peer = f"{r['peer']}: {_fmt_time(t[r['peer']])}" if r["peer"] in t else "n/a"
        summary.add_row(
            r["family"],
            r["case"],
            _fmt_time(t["dlcore"]),
            _fmt_time(t["eager"]) if "eager" in t else "n/a",
            peer,
            f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "n/a",
            f"{r['speedup_vs_peer']:.2f}x" if r["speedup_vs_peer"] else "n/a",
            f"{r['fraction_of_limit']:.0%} {r['limit']}" if r["fraction_of_limit"] else "",
            _over_base(r),
            r["goal"],
        )
    console.print(summary)

    report = {
        "device": harness.device_name(device),
        "device_type": device.type,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "quick": args.quick,
        "limits": limits,
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = (
        f"{_slug(device.type + '-' + harness.device_name(device).split(' (')[0])}-"
        f"{dt.date.today().isoformat()}"
    )
    path = os.path.join(args.out, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    console.print(f"wrote {path}")
    for fam in sorted({r["family"] for r in results}):
        png = plot_family(report, fam, os.path.join(args.out, f"{stem}-{fam}.png"))
        if png:
            console.print(f"wrote {png}")
    return report


def plot_family(report: dict, family: str, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["family"] == family and "error" not in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    ys = range(len(rows))
    for off, key, label in (
        (-0.2, "speedup_vs_eager", "vs eager"),
        (0.2, "speedup_vs_peer", "vs peer"),
    ):
        ax.barh([y + off for y in ys], [r[key] or 0 for r in rows], height=0.4, label=label)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(ys), [r["case"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup of dlcore (x, log scale)")
    ax.set_title(f"dlcore {family} on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme() -> None:
    """Rewrite README.md's results section from the newest JSON of each device."""
    newest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            device = json.load(f)["device"]
        newest[device] = path  # sorted by name, so the latest date wins
    lines = []
    for path in (newest[d] for d in sorted(newest)):
        with open(path) as f:
            rep = json.load(f)
        lines += [
            f"**{rep['device']}**, torch {rep['torch']}, {rep['date'][:10]}"
            f"{' (quick run)' if rep['quick'] else ''}, "
            f"from `benchmarks/results/{os.path.basename(path)}`:",
            "",
            "| family | case | dlcore | x eager | x peer (peer) | of limit | over base | goal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rep["results"]:
            if "error" in r:
                lines.append(f"| {r['family']} | {r['case']} | error: {r['error']} | | | | | |")
                continue
            xe = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "n/a"
            xp = f"{r['speedup_vs_peer']:.2f}x ({r['peer']})" if r["speedup_vs_peer"] else "n/a"
            lim = f"{r['fraction_of_limit']:.0%} {r['limit']}" if r["fraction_of_limit"] else ""
            lines.append(
                f"| {r['family']} | {r['case']} | {_fmt_time(r['times']['dlcore'])} | "
                f"{xe} | {xp} | {lim} | {_over_base(r)} | {r['goal']} |"
            )
        lines.append("")
    with open(README) as f:
        text = f.read()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(README, "w") as f:
        f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    print(f"updated {README} from {len(newest)} result file(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small set, short timing (< 5 min on 2 cores)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--family", action="append", choices=family_names(), help="only this family (repeatable)"
    )
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and plots")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="only regenerate README.md's results table from benchmarks/results",
    )
    args = parser.parse_args(argv)
    if args.update_readme:
        update_readme()
        return 0
    report = run(args)
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
