"""Where a run's figures go: relative `figures_dir` inside the run folder, except the packaged demo profile itself,
which writes the repository's figures/; an absolute path is that path (runtime.figures_dir_for)."""
import json

import pytest
import yaml

from bmjlib.chain import run_chain
from bmjlib.runtime import PROFILE_DIR, figures_dir_for, load_profile, packaged_name, repo_root
from nbutil import make_notebook


def test_the_demo_profile_by_name_writes_the_repository_figures(tmp_path):
    assert load_profile("demo")["figures_dir"] == "figures"
    assert figures_dir_for("demo", "figures", tmp_path / "run") == repo_root() / "figures"
    assert figures_dir_for(str(PROFILE_DIR / "demo.yaml"), "figures", tmp_path / "run") == repo_root() / "figures"


def test_a_copy_or_base_demo_profile_writes_into_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root())  # where a user runs it from: the repository's figures/ is right here
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\nphantom_patients: 50\n")
    copy = tmp_path / "demo.yaml"  # a copy keeps the packaged file's name and its figures_dir: figures
    copy.write_text((PROFILE_DIR / "demo.yaml").read_text())
    run = tmp_path / "run"
    for profile in (str(mine), str(copy)):
        assert load_profile(profile)["figures_dir"] == "figures"
        assert packaged_name(profile) is None
        assert figures_dir_for(profile, "figures", run) == run.resolve() / "figures"
    assert figures_dir_for(str(mine), "out/figs", run) == run.resolve() / "out" / "figs"
    assert figures_dir_for({"profile": "demo"}, "figures", run) == run.resolve() / "figures"  # values, not the file


def test_empty_and_absolute(tmp_path):
    run = tmp_path / "run"
    for profile in ("demo", "smoke", "paper", str(tmp_path / "x.yaml")):
        assert figures_dir_for(profile, "", run) == run.resolve() / "figures"
        assert figures_dir_for(profile, str(tmp_path / "elsewhere"), run) == tmp_path / "elsewhere"
    assert figures_dir_for("smoke", "figures", run) == run.resolve() / "figures"  # only demo is the repository's


def test_packaged_names():
    assert [packaged_name(n) for n in ("demo", "smoke", "paper")] == ["demo", "smoke", "paper"]
    assert packaged_name("nonexistent") is None


def test_the_chain_hands_the_resolved_folder_to_the_notebooks(tmp_path, monkeypatch):
    """A fixture step (not the real chain) records the figures_dir it receives from a `base: demo` profile."""
    monkeypatch.chdir(repo_root())
    nbdir = tmp_path / "notebooks"
    make_notebook(nbdir / "00_show.ipynb", [
        ("code", "import json, pathlib\npathlib.Path(run_dir, 'got.json').write_text(json.dumps(figures_dir))")],
        parameters="run_dir = 'unused'\nfigures_dir = ''")
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": "demo"}))
    out = run_chain(str(mine), out=tmp_path / "run", notebook_dir=nbdir, log=lambda *_: None)
    assert json.loads((out / "got.json").read_text()) == str(out / "figures")
    assert out / "figures" != repo_root() / "figures"


@pytest.mark.parametrize("value", ["figures", "./figures"])
def test_relative_spellings_agree(tmp_path, value):
    assert figures_dir_for("demo", value, tmp_path) == repo_root() / "figures"
