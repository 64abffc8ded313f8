"""The run's report: the acceptance lines with their figures, the Markdown summary and the chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.timing import ratio


def _get(report: dict | None, *keys: str):
    for key in keys:
        if not isinstance(report, dict):
            return None
        report = report.get(key)
    return report


def checks(results: dict) -> list[dict]:
    """The scale checks, each with its figure at N and whether it holds (None: not measured)."""
    small, large = results["catalogs"].get(str(results["small"])), results["catalogs"].get(str(results["products"]))
    lines = []

    def line(what: str, figure: str, holds: bool | None) -> None:
        lines.append({"what": what, "figure": figure, "holds": holds})

    def known(*values) -> bool:
        return all(v is not None for v in values)

    for kind in ("put", "delete"):
        p95, base = _get(large, "writes_visible", kind, "p95_ms"), _get(small, "writes_visible", kind, "p95_ms")
        times = ratio(p95, base, 2)
        line(f"{kind.upper()} visible p95 <= 1 s and <= 2x the 10k figure",
             f"{p95} ms; {times}x ({base} ms at 10k)",
             known(p95) and p95 <= 1000 and (times is None or times <= 2))  # fmt: skip
    memory = _get(large, "memory") or {}
    after, peak = memory.get("after_over_before"), memory.get("peak_over_before")
    line("RSS after the writes <= 1.2x before", f"{after}x", known(after) and after <= 1.2)
    line("RSS peak during the writes <= 1.5x before", f"{peak}x", known(peak) and peak <= 1.5)
    p50, recall = _get(large, "similar", "unfiltered", "p50_ms"), _get(large, "similar", "recall_at_10", "mean")
    line("/similar p50 <= 15 ms with recall@10 >= 0.95", f"{p50} ms, recall {recall}",
         known(p50, recall) and p50 <= 15 and recall >= 0.95)  # fmt: skip
    filtered = {kind: _get(large, "similar", kind, "over_unfiltered_p50")
                for kind in ("category_own", "category_other", "price_range")}  # fmt: skip
    line("filtered /similar p50 <= 2x unfiltered (each filter)",
         ", ".join(f"{kind} {times}x" for kind, times in filtered.items()),
         all(r is not None and r <= 2 for r in filtered.values()))  # fmt: skip
    times = _get(large, "search", "over_reference")
    line("/api/search p50 <= 1.5x (one embedding + one search)", f"{times}x", known(times) and times <= 1.5)
    ready = _get(large, "ready_seconds")
    line("ready <= 5 s", f"{ready} s", known(ready) and ready <= 5)
    job, proposal = _get(large, "duplicates", "job_seconds"), _get(large, "duplicates", "proposal")
    line("duplicate job (python -m indexer duplicates) <= 30 min",
         f"{job} s; pairs proposed against an exact scan of a sample: each photo's nearest "
         f"{_get(proposal, 'recall', 'nearest', 'recall')}, its 16 best at the threshold "
         f"{_get(proposal, 'recall', 'all', 'recall')}", known(job) and job <= 1800)  # fmt: skip
    rerun = results.get("rerun")
    unchanged, visible = _get(rerun, "unchanged_run", "seconds"), _get(rerun, "changed_run", "visible_seconds")
    measured = rerun is not None and "error" not in rerun
    line("re-run on the unchanged catalog <= 15 s", f"{unchanged} s" if measured else "not measured",
         (known(unchanged) and unchanged <= 15) if measured else None)  # fmt: skip
    embedded = _get(rerun, "changed_run", "embedded")
    line("10 changed photos searchable <= 20 s", f"{visible} s ({embedded} embedded)" if measured else "not measured",
         (known(visible, embedded) and visible <= 20 and embedded == 10) if measured else None)  # fmt: skip
    return lines


def summary(results: dict) -> str:
    sizes = [key for key in (str(results["small"]), str(results["products"])) if key in results["catalogs"]]
    sizes = list(dict.fromkeys(sizes))
    catalogs = [results["catalogs"][key] for key in sizes]

    def mb(value) -> str:
        return "-" if value is None else f"{value / 2**20:,.0f} MB"

    def ms(report, *keys) -> str:
        p50, p95 = _get(report, *keys, "p50_ms"), _get(report, *keys, "p95_ms")
        return "-" if p50 is None else f"{p50} / {p95} ms"

    rows = [
        ("import", lambda c: f"{_get(c, 'import', 'seconds')} s"),
        ("ready", lambda c: f"{_get(c, 'ready_seconds')} s"),
        ("disk: index / database", lambda c: f"{mb(_get(c, 'disk_after_import', 'index_bytes'))} / "
                                             f"{mb(_get(c, 'disk_after_import', 'database_bytes'))}"),
        ("/similar p50 / p95", lambda c: ms(c, "similar", "unfiltered")),
        ("recall@10", lambda c: f"{_get(c, 'similar', 'recall_at_10', 'mean')}"),
        *[(f"/similar {kind} p50 / p95 (x unfiltered)",
           lambda c, kind=kind: f"{ms(c, 'similar', kind)} ({_get(c, 'similar', kind, 'over_unfiltered_p50')}x)")
          for kind in ("category_own", "category_other", "price_range")],
        ("/api/search p50 / p95 (x embed + search)",
         lambda c: f"{ms(c, 'search')} ({_get(c, 'search', 'over_reference')}x)"),
        ("duplicate job (proposal alone)",
         lambda c: f"{_get(c, 'duplicates', 'job_seconds')} s ({_get(c, 'duplicates', 'proposal', 'seconds')} s)"),
        ("PUT until visible p50 / p95", lambda c: ms(c, "writes_visible", "put")),
        ("DELETE until gone p50 / p95", lambda c: ms(c, "writes_visible", "delete")),
        ("RSS before / peak / after writes",
         lambda c: f"{_get(c, 'memory', 'before_writes', 'rss_mb')} / "
                   f"{_get(c, 'memory', 'during_writes', 'peak_rss_mb')} / "
                   f"{_get(c, 'memory', 'after_writes', 'rss_mb')} MB"),
        ("PSS (shared pages counted once) before / after writes",
         lambda c: f"{_get(c, 'memory', 'before_writes', 'pss_mb')} / "
                   f"{_get(c, 'memory', 'after_writes', 'pss_mb')} MB"),
    ]  # fmt: skip
    lines = ["| what | " + " | ".join(f"{int(key):,} products" for key in sizes) + " |",
             "|---|" + "---|" * len(sizes)]  # fmt: skip
    for title, figure in rows:
        cells = [figure(c) if "error" not in c else "error" for c in catalogs]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "| check (at N) | figure | holds |", "|---|---|---|"]
    marks = {True: "yes", False: "**no**", None: "not measured"}
    lines += [f"| {line['what']} | {line['figure']} | {marks[line['holds']]} |" for line in results["checks"]]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = [key for key in dict.fromkeys((str(results["small"]), str(results["products"])))
             if "error" not in results["catalogs"].get(key, {"error": 1})]  # fmt: skip
    if not sizes:
        return
    figure = Figure(figsize=(14, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    panels = [
        ("Read latency, p50 (ms)", {
            "/similar": ("similar", "unfiltered", "p50_ms"),
            "same\ncategory": ("similar", "category_own", "p50_ms"),
            "other\ncategory": ("similar", "category_other", "p50_ms"),
            "price\nrange": ("similar", "price_range", "p50_ms"),
            "/api/search": ("search", "p50_ms"),
        }),
        ("Write until visible, p95 (ms)", {
            "PUT": ("writes_visible", "put", "p95_ms"),
            "DELETE": ("writes_visible", "delete", "p95_ms"),
        }),
        ("Server memory (RSS, MB)", {
            "ready": ("memory", "ready", "rss_mb"),
            "before\nwrites": ("memory", "before_writes", "rss_mb"),
            "peak during\nwrites": ("memory", "during_writes", "peak_rss_mb"),
            "after\nwrites": ("memory", "after_writes", "rss_mb"),
        }),
    ]  # fmt: skip
    width = 0.8 / len(sizes)
    for number, (title, bars) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), number)
        positions = np.arange(len(bars))
        for offset, size in enumerate(sizes):
            values = [_get(results["catalogs"][size], *keys) or 0 for keys in bars.values()]
            drawn = axes.bar(positions + offset * width, values, width, label=f"{int(size):,} products")
            axes.bar_label(drawn, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], fontsize=7)
        axes.set_xticks(positions + width * (len(sizes) - 1) / 2, list(bars), fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.margins(y=0.15)
        axes.legend(fontsize=8)
    large = results["catalogs"][sizes[-1]]
    recall = _get(large, "similar", "recall_at_10", "mean")
    figure.suptitle(f"{int(sizes[-1]):,} synthetic products: recall@10 {recall}, ready {large.get('ready_seconds')} s"
                    f" — {results['machine']['cpus']} CPUs, {results['machine']['processor']}", fontsize=9)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path)
