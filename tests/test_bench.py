"""`bmj bench`: the measurement machinery, the table, and a tiny end-to-end run."""
import json
import math

import numpy as np
import pytest
import torch

from bmjlib.bench import core as bench
from bmjlib.bench import run as bench_run
from bmjlib.bench.core import BenchConfig, NotAvailable, PeakMemory, Result, chain_rows, measure
from bmjlib.bench.gpu import ARMS, gpu_rows, tiny_configs
from bmjlib.bench.steps import gpu_section


def test_peak_memory_sees_a_known_allocation():
    with PeakMemory() as base:
        pass
    with PeakMemory() as mem:
        a = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        a.sum()
        del a
    assert mem.rss_mb - base.rss_mb > 150, (base.rss_mb, mem.rss_mb)
    with PeakMemory() as after:  # the counter is reset: the freed array no longer counts
        pass
    assert after.rss_mb < mem.rss_mb - 150


def test_chain_rows_read_the_recorded_seconds(tmp_path):
    state = {"00_phantom": {"key": "a", "seconds": 12.5, "finished": "x"},
             "01_cohort": {"key": "b", "seconds": 3.0, "finished": "y"}}
    p = tmp_path / "chain.json"
    p.write_text(json.dumps(state))
    rows = chain_rows(str(p))
    assert [r.name for r in rows] == ["notebook 00_phantom", "notebook 01_cohort", "demo chain total"]
    assert [r.value for r in rows] == [12.5, 3.0, 15.5]
    with pytest.raises(NotAvailable, match="does not exist"):
        chain_rows(str(tmp_path / "missing.json"))


def test_chain_total_says_when_the_steps_come_from_more_than_one_run(tmp_path):
    """A rerun redoes only what changed: a step last run hours after the others makes the sum of the steps'
    seconds something other than one run's wall time, and the total row says so."""
    one_run = {"00_phantom": {"seconds": 60.0, "finished": "2026-12-03 19:01:00"},
               "01_cohort": {"seconds": 30.0, "finished": "2026-12-03 19:01:40"}}
    later = {**one_run, "01_cohort": {"seconds": 30.0, "finished": "2026-12-03 22:00:00"}}
    for state, several in ((one_run, False), (later, True)):
        p = tmp_path / "chain.json"
        p.write_text(json.dumps(state))
        total = chain_rows(str(p))[-1]
        assert total.value == 90.0
        assert ("more than one run" in total.note) == several, total.note


def test_a_measurement_that_cannot_run_is_a_row_that_says_why_and_a_failure_is_marked_failed():
    def missing():
        raise NotAvailable("runs/demo/chain.json does not exist")

    def broken():
        raise ZeroDivisionError("division by zero")

    (r1,), (r2,) = measure("Throughput", "x", missing, log=lambda m: None), \
        measure("Throughput", "y", broken, log=lambda m: None)
    assert r1.value is None and r1.note == "not available: runs/demo/chain.json does not exist" and not r1.failed
    assert r2.value is None and r2.note.startswith("failed: ZeroDivisionError: division by zero") and r2.failed
    (ok,) = measure("Throughput", "z", lambda: Result("Throughput", "z", 4.0, "items/s"), log=lambda m: None)
    assert ok.available and ok.peak_mb > 10 and not ok.failed  # a python process holds more than 10 MB


def _broken():
    raise ZeroDivisionError("division by zero")


def _no_chain():
    raise NotAvailable("runs/demo/chain.json does not exist")


@pytest.mark.parametrize("broken", [False, True])
def test_bench_main_exits_1_when_a_measurement_fails(tmp_path, monkeypatch, capsys, broken):
    """A row that cannot run for a stated reason keeps the exit status 0; a row that raises makes it 1,
    the failed row is named on stderr, and the table is not written (a committed table is never replaced by
    one with a failed row)."""
    plan = [("Throughput", "ok row", lambda: Result("Throughput", "ok row", 4.0, "items/s")),
            ("Demo chain", "demo chain wall time", _no_chain)]
    if broken:
        plan.append(("Scaling", "broken row", _broken))
    monkeypatch.setattr(bench_run, "plan", lambda cfg, gpu: plan)
    out = tmp_path / "bench.md"
    code = bench_run.main(out=str(out), cfg=BenchConfig())
    err = capsys.readouterr().err
    assert code == (1 if broken else 0)
    assert ("broken row: failed: ZeroDivisionError" in err) == broken
    if broken:
        assert not out.exists() and not out.with_suffix(".json").exists()
        return
    table = out.read_text()
    assert "| ok row | 4.00 |" in table and "not available: runs/demo/chain.json does not exist" in table
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["failed"] for r in rows] == [False, False]


def test_markdown_table_has_one_line_per_row_and_the_machine():
    rows = [Result("Throughput", "a", 1234.5, "images/s", peak_mb=300.0),
            Result("GPU", "b", note="not available: no GPU | none")]
    md = bench.render_markdown(rows, {"cpu": "test cpu", "packages": "torch 0"}, "bmj bench --quick", 1.0)
    assert "`bmj bench --quick`" in md and "- cpu: test cpu" in md
    assert "| Throughput | a | 1,234 | images/s |  | 300 |  |" in md
    assert "| GPU | b | n/a |" in md and "no GPU \\| none" in md


def test_gpu_path_runs_on_cpu_with_a_tiny_model():
    cfg = BenchConfig(gpu_size=32, gpu_batch=2, gpu_steps=1, gpu_sample_steps=2)
    rows = gpu_rows(cfg, True, device="cpu", configs=tiny_configs(), arms=[ARMS[0], ARMS[2]])
    assert [r.name for r in rows] == [f"training samples/s: {ARMS[0].name}", f"training samples/s: {ARMS[2].name}",
                                      "counterfactuals/s (2-step DPM-Solver++, dual guidance)"]
    for r in rows:
        assert r.available and r.value > 0 and math.isfinite(r.value), (r.name, r.note)
    assert math.isfinite(rows[0].extra["loss"]) and 0 < rows[0].extra["fraction_of_peak"] < 1
    assert rows[1].compare.endswith("paper's 13.5/s") and "x baseline" in rows[1].compare


def test_gpu_section_counts_about_537_gflop_and_says_when_there_is_no_gpu():
    rows = gpu_section(BenchConfig(), requested=True)
    flops = rows[0]
    assert 520 < flops.value < 555, flops.value  # SD v1.5 UNet, 8 channels, 256 px: the reference estimate is 537
    assert 850 < flops.extra["mparams"] < 870   # SD v1.5's UNet has 860 M parameters
    if not torch.cuda.is_available():
        assert len(rows) == 2 and rows[1].value is None
        assert "no GPU was available" in rows[1].note and "bmj bench --gpu" in rows[1].note


def test_cpu_speed_options_row_measures_each_option_of_the_same_training_step():
    """One row per speed option (torch.compile only when asked), each against fp32 measured first and last; every
    arm trains the same model on the same batch, so its last loss agrees with fp32's to bf16 precision."""
    from bmjlib.bench.steps import CPU_SPEED_ARMS, Context, training_speed_options
    rows = training_speed_options(Context(BenchConfig(image_size=32, speed_batch=4, speed_steps=1)))
    names = [a.name for a in CPU_SPEED_ARMS if "compile" not in a.options]
    assert [r.name for r in rows] == [f"training samples/s on this CPU: {n}" for n in names]
    assert rows[0].extra["speedup"] == 1.0 and rows[0].compare == ""
    for r in rows:
        assert r.available and r.value > 0 and math.isfinite(r.extra["loss"]), (r.name, r.note)
        assert r.extra["loss"] == pytest.approx(rows[0].extra["loss"], rel=0.05), r.name
    for r in rows[1:]:
        assert r.compare == f"{r.value / rows[0].value:.2f}x fp32"
