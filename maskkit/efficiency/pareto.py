"""`maskkit pareto RUN... --out DIR`: quality against latency and size for runs and their compressed variants
(Menghani 2021, Sec 2: a model is worth deploying when no other is both better and cheaper).

A compressed run (`maskkit compress`) brings its numbers from compress.json; any other run is measured here with
the same protocol and profile as compress uses. DIR/pareto.png holds two panels (quality against batch-1 latency,
quality against size) with the Pareto front drawn; DIR/pareto.json and the printed table hold the numbers.
"""

import json
from pathlib import Path

import torch

from maskkit.efficiency.compress import footprint, load_compressible, quality
from maskkit.errors import MaskkitError
from maskkit.files import atomic_write_text, writing


def measure(path: Path, batch: int, length: int | None, compile: bool, repeats: int, test: str | None) -> dict:
    report = path / "compress.json"
    if report.is_file():
        data = json.loads(report.read_text())
        name = f"{path.name} ({data['operation'].replace('_', '-')} {data['amount']})"
        return {"name": name, "run": str(path), **_row(data["after"])}
    c = load_compressible(path)
    measured = {"quality": quality(c, torch.device("cpu"), test),
                "footprint": footprint(c, batch, length, compile, repeats)}
    return {"name": path.name, "run": str(path), **_row(measured)}


def _row(measured: dict) -> dict:
    f = measured["footprint"]
    return {"metric": measured["quality"]["metric"], "quality": measured["quality"]["value"],
            "latency_ms": f["latency_ms_median"], "size_mb": f["size_bytes"] / 1e6,
            "throughput_per_s": f["throughput_per_s"], "compiled": f.get("compiled", False)}


def front(rows: list[dict], cost: str) -> list[int]:
    """Indices of the rows no other row beats on both quality (higher) and `cost` (lower)."""
    return [i for i, r in enumerate(rows)
            if not any(o["quality"] >= r["quality"] and o[cost] <= r[cost] and (o["quality"], o[cost]) !=
                       (r["quality"], r[cost]) for o in rows)]


def pareto(runs: list[str], out: str | Path, *, batch: int = 32, length: int | None = None, compile: bool = False,
           repeats: int = 20, test: str | None = None, names: list[str] | None = None) -> list[dict]:
    """`names`: one label per run for the plot and table (default: the run folder's name)."""
    if not runs:
        raise MaskkitError("pareto needs at least one run")
    if names is not None and len(names) != len(runs):
        raise MaskkitError(f"--names has {len(names)} label{'s' * (len(names) != 1)} for {len(runs)} runs; "
                           "give one per run, in order")
    rows = [measure(Path(run).expanduser(), batch, length, compile, repeats, test) for run in runs]
    for row, name in zip(rows, names, strict=True) if names else ():
        row["name"] = name
    metrics = {r["metric"] for r in rows}
    if len(metrics) > 1:
        raise MaskkitError(f"the runs are measured by different protocols ({', '.join(sorted(metrics))}); compare "
                           "variants of one task")
    for cost in ("latency_ms", "size_mb"):
        for i in front(rows, cost):
            rows[i][f"front_{cost}"] = True
    out = Path(out).expanduser()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "pareto.json", json.dumps(rows, indent=1))
        _plot(rows, out / "pareto.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, cost, label in ((axes[0], "latency_ms", "latency at batch 1 (ms)"), (axes[1], "size_mb", "size (MB)")):
        low, high = min(r[cost] for r in rows), max(r[cost] for r in rows)
        by_quality = sorted(range(len(rows)), key=lambda i: rows[i]["quality"])
        for rank, i in enumerate(by_quality):
            r = rows[i]
            axis.scatter(r[cost], r["quality"], s=40, color="C1" if r.get(f"front_{cost}") else "C0")
            # Labels of the right half to the left of their point, and neighbours in quality above / below
            # theirs in turn, so that close points stay readable.
            right = r[cost] > (low + high) / 2
            axis.annotate(r["name"], (r[cost], r["quality"]), fontsize=7, textcoords="offset points",
                          xytext=(-5 if right else 5, 4 if rank % 2 else -9), ha="right" if right else "left")
        best = sorted((r for r in rows if r.get(f"front_{cost}")), key=lambda r: r[cost])
        axis.plot([r[cost] for r in best], [r["quality"] for r in best], color="C1", lw=1, label="Pareto front")
        axis.set_xlabel(label)
        axis.set_ylabel(rows[0]["metric"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    compiled = {r["compiled"] for r in rows}
    figure.suptitle("torch.compile'd" if compiled == {True} else "eager" if compiled == {False} else
                    "mixed: some timed compiled, some eager (pareto.json says which)", fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
