"""Registration beside ProgEmu's configuration: both at each one's own resolution and at the other's, on phantom
pairs whose true transform is known; pairs/s and TRE with bootstrap intervals (bmjlib.bench.registration)."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from bmjlib.bench import registration as B
from bmjlib.data import registration as R
from bmjlib.data.registration_eval import benchmark_arms
from bmjlib.phantom import cohort as phantom


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    root = tmp_path_factory.mktemp("regbench")
    phantom.write_cohort(root, n_patients=6, size=128, seed=3, workers=1)
    # small stand-ins with the real relation: ours coarse (64 px), the baseline fine (128 px) and shortened
    ours, base = R.RegConfig(size=64), replace(R.PROGEMU, size=128, iterations=20)
    return B.compare(root, n_pairs=3, n_boot=50, ours=ours, baseline=base, log=None)


def test_arms_each_at_its_own_resolution_and_at_the_others():
    ours, base = R.RegConfig(), R.PROGEMU
    arms = [(m, c.size, own) for m, c, own in benchmark_arms(ours, base)]
    assert arms == [("ours", 256, True), ("ours", 512, False), ("progemu", 256, False), ("progemu", 512, True)]
    assert [(m, c.size) for m, c, _ in benchmark_arms(ours, replace(base, size=256))] == [("ours", 256), ("progemu", 256)]
    progemu_at_256 = benchmark_arms(ours, base)[2][1]
    assert progemu_at_256.metric == "meansquares" and progemu_at_256.iterations == 200  # only the size changes


def test_the_known_transform_is_recovered(res):
    per = res["result"]["per_pair"]
    assert len(per) == 4 * 3 and set(per["pair_id"].value_counts()) == {4}  # every arm on the same pairs
    ours_own = per[(per["method"] == "ours") & per["own_resolution"]]
    assert (ours_own["status"] == "ok").all()
    assert ours_own["tre_px256"].max() < 3  # px at 256; before registration the phantom's poses differ by ~15 px
    assert (per["seconds"] > 0).all() and (per["cpu_seconds"] > 0).all()


def test_tables_have_the_published_columns_and_intervals(res, tmp_path):
    arms, comp = res["arms"], res["comparisons"]
    assert list(arms.columns) == ["method", "resolution_px", "resolution", "pairs", "pairs_per_s", "pairs_per_s_lo",
                                  "pairs_per_s_hi", "cpu_pairs_per_s", "cpu_pairs_per_s_lo", "cpu_pairs_per_s_hi",
                                  "tre_mean_px256", "tre_mean_px256_lo", "tre_mean_px256_hi",
                                  "tre_p95_px256", "failed_or_diverged"]
    assert list(arms["resolution_px"]) == [64, 128, 64, 128]
    assert list(arms["resolution"]) == ["its own", "the other's", "the other's", "its own"]
    assert (arms["pairs_per_s_lo"] <= arms["pairs_per_s"]).all() and (arms["pairs_per_s"] <= arms["pairs_per_s_hi"]).all()
    per = res["result"]["per_pair"]
    o = per[(per["method"] == "ours") & (per["size_px"] == 64)]
    assert arms.iloc[0]["pairs_per_s"] == pytest.approx(3 / o["seconds"].sum())
    assert list(comp["comparison"]) == ["each at its own resolution (ours 64 px, ProgEmu 128 px)",
                                        "same resolution, 64 px", "same resolution, 128 px"]
    p = per[(per["method"] == "progemu") & (per["size_px"] == 128)]
    assert comp.iloc[0]["speed_ratio"] == pytest.approx(p["seconds"].sum() / o["seconds"].sum())
    assert comp.iloc[0]["tre_difference_px256"] == pytest.approx(
        np.mean(o.sort_values("pair_id")["tre_px256"].to_numpy() - p.sort_values("pair_id")["tre_px256"].to_numpy()))
    for k in ("speed_ratio", "cpu_speed_ratio", "tre_difference_px256"):
        assert (comp[f"{k}_lo"] <= comp[k] + 1e-12).all() and (comp[k] <= comp[f"{k}_hi"] + 1e-12).all()

    B.write(res, tmp_path, "python -m bmjlib.bench.registration --pairs 3", 1.0)
    md = (tmp_path / f"{B.TABLE}.md").read_text()
    assert "Command: `python -m bmjlib.bench.registration --pairs 3`" in md and "Speed ratio, ours / ProgEmu" in md
    csv = pd.read_csv(tmp_path / f"{B.TABLE}.csv")
    assert sorted(csv["table"].unique()) == ["arms", "comparisons"] and len(csv) == 4 + 3
