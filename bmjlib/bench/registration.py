"""Registration beside ProgEmu's configuration, with 95 % bootstrap intervals (paper §3; ProgEmu's
`register_chexpertplus.py`).

`bmjlib.data.registration_eval.benchmark` registers the same truly-PA phantom pairs with both configurations,
each at its own resolution (ours 256 px, ProgEmu's 512 px) and each at the other's, and measures every pair's
seconds and TRE against the phantom's true transform. Here the pairs are resampled (`metrics.bootstrap_ci`, the
same resamples for every column of a row) into intervals for pairs/s, mean TRE, and the paired comparisons: the
speed ratio ours / ProgEmu and the TRE difference ours - ProgEmu, at equal resolution and each at its own.

    python -m bmjlib.bench.registration --pairs 50 --out figures

writes figures/table_registration_benchmark.{csv,md} (the Markdown names the command, the machine and the date).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bmjlib.bench.core import machine_info
from bmjlib.data.registration_eval import benchmark
from bmjlib.evaluation.metrics import bootstrap_ci
from bmjlib.io import atomic_write_csv, markdown_table, write_table
from bmjlib.runtime import resolve

TABLE = "table_registration_benchmark"
LABEL = {"ours": "ours", "progemu": "ProgEmu's configuration"}


def _nanmean(x) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _arm(per: pd.DataFrame, method: str, size: int) -> pd.DataFrame:
    return per[(per["method"] == method) & (per["size_px"] == size)].sort_values("pair_id").reset_index(drop=True)


def arms_table(result: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per arm: method, resolution, own or not, pairs, pairs/s and mean TRE (px at 256) with 95 %
    bootstrap intervals over pairs, TRE p95, failed or diverged."""
    per = result["per_pair"]
    rows = []
    for a in result["arms"].to_dict("records"):
        d = _arm(per, a["method"], a["size_px"])
        sec, cpu, tre = (d[c].to_numpy(float) for c in ("seconds", "cpu_seconds", "tre_px256"))

        def stat(i, sec=sec, cpu=cpu, tre=tre):
            return {"pairs_per_s": len(i) / sec[i].sum(), "cpu_pairs_per_s": len(i) / cpu[i].sum(),
                    "tre_mean_px256": _nanmean(tre[i])}
        ci = bootstrap_ci(stat, len(d), n_boot, seed) if len(d) else {}
        row = {"method": LABEL[a["method"]], "resolution_px": int(a["size_px"]),
               "resolution": "its own" if a["own_resolution"] else "the other's", "pairs": len(d),
               **stat(np.arange(len(d)))}
        for k, (lo, hi) in ci.items():
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        row.update(tre_p95_px256=a["tre_p95_px256"], failed_or_diverged=int(a["failed_or_diverged"]))
        rows.append(row)
    cols = ["method", "resolution_px", "resolution", "pairs", "pairs_per_s", "pairs_per_s_lo", "pairs_per_s_hi",
            "cpu_pairs_per_s", "cpu_pairs_per_s_lo", "cpu_pairs_per_s_hi", "tre_mean_px256", "tre_mean_px256_lo", "tre_mean_px256_hi", "tre_p95_px256", "failed_or_diverged"]
    return pd.DataFrame(rows).reindex(columns=cols)


def comparisons(result: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired comparisons on the same pairs: speed ratio (ours pairs/s over ProgEmu's) and TRE difference
    (ours - ProgEmu, px at 256; negative = ours closer to the truth), each with a 95 % bootstrap interval: each
    at its own resolution, and at every resolution both were run at."""
    per, arms = result["per_pair"], result["arms"]
    own = {m: int(arms[(arms["method"] == m) & arms["own_resolution"]]["size_px"].iloc[0]) for m in ("ours", "progemu")}
    plans = [(f"each at its own resolution (ours {own['ours']} px, ProgEmu {own['progemu']} px)",
              own["ours"], own["progemu"])]
    plans += [(f"same resolution, {s} px", s, s) for s in sorted(set(arms["size_px"]))
              if {"ours", "progemu"} <= set(arms.loc[arms["size_px"] == s, "method"])]
    rows = []
    for name, so, sp in plans:
        o, p = _arm(per, "ours", so), _arm(per, "progemu", sp)
        if list(o["pair_id"]) != list(p["pair_id"]):
            raise ValueError(f"{name}: the two arms registered different pairs")
        so_, sp_ = o["seconds"].to_numpy(float), p["seconds"].to_numpy(float)
        co_, cp_ = o["cpu_seconds"].to_numpy(float), p["cpu_seconds"].to_numpy(float)
        to_, tp_ = o["tre_px256"].to_numpy(float), p["tre_px256"].to_numpy(float)

        def stat(i, so_=so_, sp_=sp_, co_=co_, cp_=cp_, to_=to_, tp_=tp_):
            return {"speed_ratio": sp_[i].sum() / so_[i].sum(), "cpu_speed_ratio": cp_[i].sum() / co_[i].sum(),
                    "tre_difference_px256": _nanmean(to_[i] - tp_[i])}
        row = {"comparison": name, "pairs": len(o), **stat(np.arange(len(o)))}
        for k, (lo, hi) in bootstrap_ci(stat, len(o), n_boot, seed).items():
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def _ci(r, k: str, digits: int) -> str:
    v, lo, hi = r[k], r.get(f"{k}_lo", np.nan), r.get(f"{k}_hi", np.nan)
    if pd.isna(v):
        return ""
    return f"{v:.{digits}f}" + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")


def published(arms: pd.DataFrame, comp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables as printed: `value [lo, hi]` cells."""
    a = pd.DataFrame({"Method": arms["method"], "Resolution (px)": arms["resolution_px"],
                      "Resolution is": arms["resolution"], "Pairs": arms["pairs"],
                      "Pairs/s": [_ci(r, "pairs_per_s", 2) for _, r in arms.iterrows()],
                      "Pairs per CPU-second": [_ci(r, "cpu_pairs_per_s", 2) for _, r in arms.iterrows()],
                      "TRE mean (px @256)": [_ci(r, "tre_mean_px256", 3) for _, r in arms.iterrows()],
                      "TRE p95 (px @256)": arms["tre_p95_px256"].round(3),
                      "Failed or diverged": arms["failed_or_diverged"]})
    c = pd.DataFrame({"Comparison (same pairs)": comp["comparison"], "Pairs": comp["pairs"],
                      "Speed ratio, ours / ProgEmu": [_ci(r, "speed_ratio", 2) for _, r in comp.iterrows()],
                      "Speed ratio in CPU time": [_ci(r, "cpu_speed_ratio", 2) for _, r in comp.iterrows()],
                      "TRE difference, ours - ProgEmu (px @256)": [_ci(r, "tre_difference_px256", 3)
                                                                   for _, r in comp.iterrows()]})
    return a, c


def compare(phantom_dir=None, n_pairs: int = 12, n_boot: int = 1000, seed: int = 0, log=print, **kw) -> dict:
    """`registration_eval.benchmark` plus the interval tables: {"result", "arms", "comparisons"}."""
    result = benchmark(phantom_dir, n_pairs=n_pairs, seed=seed, log=log, **kw)
    return {"result": result, "arms": arms_table(result, n_boot, seed), "comparisons": comparisons(result, n_boot, seed)}


def write(res: dict, folder, command: str, seconds: float, name: str = TABLE) -> list[Path]:
    """folder/<name>.csv (every number of both tables) and <name>.md (caption with the command, machine and
    date; the two tables; what the columns mean)."""
    arms, comp = res["arms"], res["comparisons"]
    a, c = published(arms, comp)
    r, meta = res["result"], machine_info()
    caption = (f"Registration of the same {r['pairs']} truly-PA phantom pairs ({r['phantom_size']} px images, true "
               f"transform known) by our configuration and by ProgEmu's, each at its own resolution and at the "
               f"other's; one ITK thread, one process, one arm after the other. 95 % bootstrap intervals over pairs "
               f"({time.strftime('%Y-%m-%d', time.gmtime())}; {seconds:.0f} s in all).\n\n"
               f"Command: `{command}`\n\nMachine: {meta['cpu']}; {meta['memory']}; load average at the end "
               f"{meta['load average (1/5/15 min) at the end']}; {meta['packages']}.")
    note = ("\n" + markdown_table(c) +
            "\n- Pairs/s: pairs over the summed per-pair wall-clock seconds (read both images, resize, register, "
            "resample, score); pairs per CPU-second: the same over this process's CPU time, which other work on a "
            "shared machine disturbs less.\n"
            "- TRE: mean distance between where the estimated and the true transform send the prior's lung pixels, in "
            "px at 256 px; pairs whose registration failed have none.\n"
            "- Speed ratio > 1: ours faster; TRE difference < 0: ours closer to the true transform.\n")
    long = pd.concat([arms.assign(table="arms"), comp.assign(table="comparisons")], ignore_index=True)
    paths = write_table(a, folder, name, caption, note)
    atomic_write_csv(Path(folder) / f"{name}.csv", long)  # every number, not the printed cells
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmjlib.bench.registration", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50, help="truly-PA phantom pairs (default 50)")
    ap.add_argument("--phantom", default=None, help="an existing phantom folder (default: a new 512 px one)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="figures", help="folder for table_registration_benchmark.{csv,md}")
    a = ap.parse_args(argv)
    command = "python -m bmjlib.bench.registration " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    res = compare(a.phantom, n_pairs=a.pairs, n_boot=a.bootstrap, seed=a.seed,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    arms, comp = published(res["arms"], res["comparisons"])
    print(markdown_table(arms))
    print(markdown_table(comp))
    for p in write(res, resolve(a.out), command.strip(), seconds):
        print(f"written {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
