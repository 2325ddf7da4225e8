"""The chain never serves stale results and refuses what it cannot run (bmjlib.chain, bmjlib.runtime):
a step reruns when an earlier step, its code or its outputs change; ranges, unknown keys, types and base
cycles are refused in one line before anything runs; one run per folder; interrupted runs leave nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bmjlib.chain import ChainError, code_fingerprint, notebook_imports, remove_temporaries, run_chain
from bmjlib.io import code_files
from bmjlib.runtime import THREADS_ENV, ProfileError, load_profile, repo_root
from nbutil import make_notebook

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def chain(tmp_path):
    """Three steps writing into their own NN_* folders: 00 writes a message, 01 upper-cases it, 02 records
    the thread count its kernel was given."""
    nbdir = tmp_path / "notebooks"
    make_notebook(nbdir / "00_write.ipynb", [
        ("md", "# Step 0"),
        ("code", "from pathlib import Path\nd = Path(run_dir, '00_write'); d.mkdir(exist_ok=True)\n"
                 "(d / 'msg.txt').write_text(message)"),
    ], parameters="run_dir = 'unused'\nmessage = 'default'\nverbose = False")
    make_notebook(nbdir / "01_upper.ipynb", [
        ("md", "# Step 1"),
        ("code", "from pathlib import Path\nd = Path(run_dir, '01_upper'); d.mkdir(exist_ok=True)\n"
                 "(d / 'msg.txt').write_text(Path(run_dir, '00_write', 'msg.txt').read_text().upper())"),
    ], parameters="run_dir = 'unused'")
    make_notebook(nbdir / "02_threads.ipynb", [
        ("md", "# Step 2"),
        ("code", "import os\nfrom pathlib import Path\nd = Path(run_dir, '02_threads'); d.mkdir(exist_ok=True)\n"
                 f"(d / 'threads.txt').write_text(os.environ['{THREADS_ENV}'])"),
    ], parameters="run_dir = 'unused'\nrepeats = 1")
    return nbdir


def ran(lines: list[str]) -> list[str]:
    return [line.split("]")[1].split(":")[0].strip() for line in lines if line.endswith("running") or "running (" in line]


def test_a_changed_earlier_step_reruns_everything_after_it(chain, tmp_path):
    out, lines = tmp_path / "run", []
    run_chain({"profile": "t", "message": "abc"}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines) == ["00_write", "01_upper", "02_threads"]
    # step 00 alone with another setting, then a plain rerun: 01 and 02 must not be served stale
    run_chain({"profile": "t", "message": "xyz"}, out=out, start=0, stop=0, notebook_dir=chain, **QUIET)
    lines.clear()
    run_chain({"profile": "t", "message": "xyz"}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines) == ["01_upper", "02_threads"]
    assert (out / "01_upper" / "msg.txt").read_text() == "XYZ"
    lines.clear()
    run_chain({"profile": "t", "message": "xyz"}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines) == [] and sum("up to date" in line for line in lines) == 3


def test_a_profile_may_end_the_chain_early_and_to_overrides_it(chain, tmp_path):
    lines = []
    run_chain({"profile": "t", "message": "abc", "last_step": 1}, out=tmp_path / "run", notebook_dir=chain,
              log=lines.append)
    assert ran(lines) == ["00_write", "01_upper"] and not (tmp_path / "run" / "02_threads").exists()
    lines.clear()
    run_chain({"profile": "t", "message": "abc", "last_step": 1}, out=tmp_path / "run", stop=2, notebook_dir=chain,
              log=lines.append)
    assert ran(lines) == ["02_threads"]
    with pytest.raises(ChainError, match="last_step: 'two' must be a step number"):
        run_chain({"profile": "t", "last_step": "two"}, out=tmp_path / "run2", notebook_dir=chain, **QUIET)


def test_a_deleted_or_altered_output_reruns_that_step(chain, tmp_path):
    out, lines = tmp_path / "run", []
    run_chain({"profile": "t", "message": "abc"}, out=out, notebook_dir=chain, **QUIET)
    (out / "01_upper" / "msg.txt").unlink()
    run_chain({"profile": "t", "message": "abc"}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines) == ["01_upper", "02_threads"] and (out / "01_upper" / "msg.txt").read_text() == "ABC"
    assert any("outputs are missing or were changed" in line for line in lines)
    lines.clear()
    (out / "00_write" / "msg.txt").write_text("tampered")
    run_chain({"profile": "t", "message": "abc"}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines)[0] == "00_write" and (out / "00_write" / "msg.txt").read_text() == "abc"


def test_code_fingerprint_follows_the_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "metrics.py").write_text("def auroc():\n    return 0.5\n")
    (pkg / "evaluate.py").write_text("from pkg.metrics import auroc\n")
    (pkg / "phantom.py").write_text("import numpy\n")
    nb7 = make_notebook(tmp_path / "07.ipynb", [("code", "from pkg import evaluate\n%matplotlib inline")])
    nb0 = make_notebook(tmp_path / "00.ipynb", [("code", "import pkg.phantom as P")])
    assert notebook_imports(nb7, "pkg") == {"pkg", "pkg.evaluate"}
    assert {f.name for f in code_files({"pkg.evaluate"}, pkg)} == {"__init__.py", "evaluate.py", "metrics.py"}
    before7, before0 = code_fingerprint(nb7, pkg), code_fingerprint(nb0, pkg)
    (pkg / "metrics.py").write_text("def auroc():\n    return 0.75  # a fix\n")
    assert code_fingerprint(nb7, pkg) != before7  # the evaluation reruns
    assert code_fingerprint(nb0, pkg) == before0  # the phantom does not


def test_the_real_evaluation_depends_on_the_metrics_and_the_phantom_does_not():
    nbdir = repo_root() / "notebooks"
    seven = {str(f.relative_to(repo_root())) for f in code_files(notebook_imports(nbdir / "07_evaluate.ipynb"))}
    zero = {str(f.relative_to(repo_root())) for f in code_files(notebook_imports(nbdir / "00_phantom.ipynb"))}
    assert "bmjlib/evaluation/metrics.py" in seven and "bmjlib/evaluation/validity.py" in seven
    assert "bmjlib/evaluation/metrics.py" not in zero and "bmjlib/phantom/anatomy.py" in zero


@pytest.mark.parametrize("start,stop,match", [(99, None, "--from 99: no such step"),
                                              (2, 1, "the first step comes after the last"),
                                              (None, -1, "--to -1: no such step")])
def test_step_ranges_are_checked_before_running(chain, tmp_path, start, stop, match):
    with pytest.raises(ChainError, match=match):
        run_chain({"profile": "t"}, out=tmp_path / "run", start=start, stop=stop, notebook_dir=chain, **QUIET)
    assert not (tmp_path / "run").exists()


def test_profile_keys_and_types_are_checked(chain, tmp_path):
    with pytest.raises(ChainError, match="'stage1_epoch' is not a parameter of any notebook; did you mean "
                                         "'stage1_epochs'"):
        run_chain({"profile": "t", "stage1_epoch": 3}, out=tmp_path / "r", notebook_dir=chain, **QUIET)
    with pytest.raises(ChainError, match="verbose: 'false' must be true or false"):
        run_chain({"profile": "t", "verbose": "false"}, out=tmp_path / "r", notebook_dir=chain, **QUIET)
    with pytest.raises(ChainError, match="repeats: '3' must be a number"):
        run_chain({"profile": "t", "repeats": "3"}, out=tmp_path / "r", notebook_dir=chain, **QUIET)
    with pytest.raises(ChainError, match="threads"):
        run_chain({"profile": "t", "threads": "many"}, out=tmp_path / "r", notebook_dir=chain, **QUIET)
    assert not (tmp_path / "r").exists()


def test_base_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": str(tmp_path / "b.yaml"), "seed": 1}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": str(tmp_path / "a.yaml"), "seed": 2}))
    (tmp_path / "self.yaml").write_text(yaml.safe_dump({"base": str(tmp_path / "self.yaml")}))
    with pytest.raises(ProfileError, match="comes back to itself .*a -> b -> a"):
        load_profile(str(tmp_path / "a.yaml"))
    with pytest.raises(ProfileError, match="comes back to itself"):
        load_profile(str(tmp_path / "self.yaml"))


def test_the_cli_says_one_line_and_exits_non_zero(tmp_path):
    (tmp_path / "typo.yaml").write_text("base: smoke\nstage1_epoch: 3\n")
    (tmp_path / "bad.yaml").write_text("base: smoke\nllm_data_use_override: 'false'\n")
    for args, needle in ((["--profile", str(tmp_path / "typo.yaml")], "did you mean 'stage1_epochs'"),
                         (["--profile", str(tmp_path / "bad.yaml")], "must be true or false"),
                         (["--profile", "smoke", "--from", "99"], "--from 99: no such step"),
                         (["--profile", "nonexistent"], "no profile named")):
        r = subprocess.run([sys.executable, "-m", "bmjlib.cli", "reproduce", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_run_folder_may_not_hold_the_source_notebooks(chain, tmp_path):
    with pytest.raises(ChainError, match="may not contain the source notebooks"):
        run_chain({"profile": "t"}, out=tmp_path, notebook_dir=chain, **QUIET)
    with pytest.raises(ChainError, match="may not contain the source notebooks"):
        run_chain({"profile": "t"}, out=chain, notebook_dir=chain, **QUIET)


def test_one_run_per_folder_and_a_stale_lock_is_taken_over(chain, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".bmj.lock").write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(ChainError, match=f"another bmj reproduce \\(pid {os.getpid()}\\) is running"):
        run_chain({"profile": "t"}, out=out, notebook_dir=chain, **QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".bmj.lock").write_text(str(dead.pid))  # its process is gone
    run_chain({"profile": "t"}, out=out, notebook_dir=chain, **QUIET)
    assert not (out / ".bmj.lock").exists() and (out / "01_upper" / "msg.txt").is_file()


def test_temporary_files_of_a_killed_step_are_removed(chain, tmp_path):
    out = tmp_path / "run"
    run_chain({"profile": "t"}, out=out, notebook_dir=chain, **QUIET)
    (out / "01_upper" / ".msg.txt.k2j3.tmp.txt").write_text("half")
    (out / "01_upper" / ".cache.a8f.tmp").mkdir()
    (out / "01_upper" / ".cache.a8f.tmp" / "part").write_text("x")
    (out / "01_upper" / ".hidden-but-kept").write_text("keep")
    lines = []
    run_chain({"profile": "t"}, out=out, notebook_dir=chain, log=lines.append)
    assert not (out / "01_upper" / ".msg.txt.k2j3.tmp.txt").exists() and not (out / "01_upper" / ".cache.a8f.tmp").exists()
    assert (out / "01_upper" / ".hidden-but-kept").exists()
    assert any("removed 2 temporary file(s)" in line for line in lines)
    assert remove_temporaries(out) == 0


def test_the_thread_count_is_a_recorded_setting(chain, tmp_path):
    out = tmp_path / "run"
    run_chain({"profile": "t", "threads": 1}, out=out, notebook_dir=chain, **QUIET)
    assert (out / "02_threads" / "threads.txt").read_text() == "1"
    state = json.loads((out / "chain.json").read_text())
    assert {v["threads"] for v in state.values()} == {1}
    lines = []  # another thread count is another run setting: every step reruns
    run_chain({"profile": "t", "threads": 2}, out=out, notebook_dir=chain, log=lines.append)
    assert ran(lines) == ["00_write", "01_upper", "02_threads"]
    assert (out / "02_threads" / "threads.txt").read_text() == "2"


def test_secret_values_are_refused_without_being_repeated(chain, tmp_path):
    key = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
    for values in ({"llm_key_env": key}, {"llm_base_url": f"https://user:{key}@example.org/v1"}):
        with pytest.raises(ChainError) as e:
            run_chain({"profile": "t", **values}, out=tmp_path / "r", notebook_dir=chain, **QUIET)
        assert key not in str(e.value) and "secrets never pass as notebook parameters" in str(e.value)
