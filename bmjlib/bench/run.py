"""`bmj bench`: run every measurement in table order, print the table, write figures/benchmarks.md (+ .json)."""
from __future__ import annotations

import shlex
import sys
import time
from typing import Any, Callable

from bmjlib.bench import steps as S
from bmjlib.bench.core import BenchConfig, Result, chain_rows, machine_info, measure, render_markdown, render_text
from bmjlib.io import atomic_write_json, atomic_write_text
from bmjlib.runtime import resolve


def plan(cfg: BenchConfig, gpu: bool) -> list[tuple[str, str, Callable[[], Any]]]:
    """Every measurement, in table order: (group, name shown if it fails, function)."""
    ctx = S.Context(cfg)
    items: list[tuple[str, str, Callable[[], Any]]] = [
        ("Throughput", "phantom images/s", lambda: S.phantom_rate(ctx)),
        ("Throughput", "registration pairs/s", lambda: S.registration_rate(ctx)),
        ("Throughput", "offline descriptions/s", lambda: S.description_rate(ctx)),
        ("Throughput", "training samples/s (cached latents + text states)", lambda: S.training_cached(ctx)),
        ("Throughput", "two trainings side by side", lambda: S.training_side_by_side(ctx)),
        ("Throughput", "training with fused AdamW", lambda: S.training_fused_adamw(ctx)),
        ("Throughput", "training speed options on this CPU", lambda: S.training_speed_options(ctx)),
        ("Throughput", f"counterfactuals/s (DPM-Solver++ {cfg.fast_steps} steps)", lambda: S.sampler_rates(ctx)),
        ("Scaling", "registration time vs image size", lambda: S.registration_scaling(ctx)),
        ("Scaling", "generation time vs image size", lambda: S.generation_scaling(ctx)),
        ("Scaling", "training samples/s vs batch size", lambda: S.training_batch_scaling(ctx)),
        ("Demo chain", "demo chain wall time", lambda: chain_rows(cfg.chain_json)),
    ]
    items.append(("GPU", "GPU section", lambda: S.gpu_section(cfg, requested=gpu)))
    return items


def run(cfg: BenchConfig, gpu: bool = False, log=print) -> list[Result]:
    rows: list[Result] = []
    for group, name, fn in plan(cfg, gpu):
        log(f"[bench] {group}: {name}")
        rows += measure(group, name, fn, log=log)
    return rows


def main(quick: bool = False, out: str = "figures/benchmarks.md", gpu: bool = False,
         cfg: BenchConfig | None = None) -> int:
    """`bmj bench`: run every measurement, print the table, write it (Markdown) to `out` and `out`.json.
    Returns 1 without writing when a measurement failed, naming the failed rows; 0 otherwise."""
    cfg = cfg or (BenchConfig.quick() if quick else BenchConfig.full())
    command = "bmj bench" + (" --quick" if quick else "") + (" --gpu" if gpu else "") + \
              (f" --out {shlex.quote(out)}" if out != "figures/benchmarks.md" else "")
    t0 = time.perf_counter()
    rows = run(cfg, gpu=gpu, log=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    meta = machine_info()
    print(render_text(rows))
    print(f"\n{sum(r.available for r in rows)} of {len(rows)} rows measured in {seconds:.0f} s")
    failed = [r for r in rows if r.failed]
    if failed:
        # A table with a failed row is not published: the committed table stays as it was.
        print(f"bmj bench: {len(failed)} measurement(s) failed, {out or 'no file'} not written: "
              + "; ".join(f"{r.group} / {r.name}: {r.note}" for r in failed), file=sys.stderr)
        return 1
    if out:
        path = resolve(out)
        atomic_write_text(path, render_markdown(rows, meta, command, seconds))
        atomic_write_json(path.with_suffix(".json"),
                          {"command": command, "seconds": seconds, "meta": meta,
                           "rows": [r.__dict__ for r in rows]})
        print(f"written {path}")
    return 0
