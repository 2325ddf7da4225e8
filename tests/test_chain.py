"""The papermill chain runner, on small fixture notebooks."""
import json

import pytest
import yaml

from bmjlib.chain import (ChainError, discover_steps, figures_folder, load_profile, model_names, run_chain,
                          sampler_settings)
from bmjlib.evaluation.counterfactuals import DEMO_MODELS
from bmjlib.runtime import resolve
from bmjlib.io import sha256_file
from nbutil import make_notebook


@pytest.fixture
def chain(tmp_path):
    nbdir = tmp_path / "notebooks"
    make_notebook(nbdir / "00_write.ipynb", [
        ("md", "# Step 0 writes a file"),
        ("code", "from pathlib import Path\nPath(run_dir, 'step0.txt').write_text(message)\nprint('wrote', message)"),
    ], parameters="run_dir = 'unused'\nmessage = 'default'")
    make_notebook(nbdir / "01_read.ipynb", [
        ("md", "# Step 1 reads it"),
        ("code", "from pathlib import Path\ntext = Path(run_dir, 'step0.txt').read_text()\n"
                 "Path(run_dir, 'step1.txt').write_text(text.upper())"),
    ], parameters="run_dir = 'unused'")
    make_notebook(nbdir / "02_fail.ipynb", [
        ("md", "# Step 2 fails in a known cell"),
        ("code", "x = 1"),
        ("code", "if fail:\n    raise ValueError('boom in step two')"),
    ], parameters="run_dir = 'unused'\nfail = True")
    return nbdir


def test_runs_in_order_and_stops_at_failing_cell(chain, tmp_path):
    sources = {p: sha256_file(p) for p in chain.iterdir()}
    out = tmp_path / "run"
    with pytest.raises(ChainError) as e:
        run_chain({"profile": "t", "message": "hello"}, out=out, notebook_dir=chain, log=lambda *_: None)
    msg = str(e.value)
    # the parameters cell is index 1 (after the markdown), so the raising cell is index 3
    assert "02_fail.ipynb" in msg and "cell 3" in msg and "ValueError: boom in step two" in msg
    assert (out / "step1.txt").read_text() == "HELLO"
    assert {p: sha256_file(p) for p in chain.iterdir()} == sources, "source notebooks must never be written"
    executed = json.loads((out / "notebooks" / "01_read.ipynb").read_text())
    assert executed["metadata"]["papermill"]["parameters"]["run_dir"] == str(out.resolve())
    state = json.loads((out / "chain.json").read_text())
    assert set(state) == {"00_write", "01_read"}


def test_from_reuses_earlier_outputs_and_rerun_skips(chain, tmp_path):
    out = tmp_path / "run"
    lines = []
    run_chain({"profile": "t", "message": "abc", "fail": False}, out=out, notebook_dir=chain, log=lines.append)
    (out / "step1.txt").unlink()
    lines.clear()
    run_chain({"profile": "t", "message": "abc", "fail": False}, out=out, start=1, notebook_dir=chain,
              log=lines.append)
    assert (out / "step1.txt").read_text() == "ABC"
    assert not any("00_write" in line for line in lines)
    lines.clear()
    run_chain({"profile": "t", "message": "abc", "fail": False}, out=out, notebook_dir=chain, log=lines.append)
    assert sum("up to date" in line for line in lines) == 3
    # a changed parameter reruns that step and everything after it
    lines.clear()
    run_chain({"profile": "t", "message": "xyz", "fail": False}, out=out, notebook_dir=chain, log=lines.append)
    assert (out / "step1.txt").read_text() == "XYZ"
    assert not any("up to date" in line for line in lines)


def test_from_without_earlier_outputs_is_refused(chain, tmp_path):
    with pytest.raises(ChainError, match="00_write has not completed"):
        run_chain({"profile": "t"}, out=tmp_path / "fresh", start=1, notebook_dir=chain, log=lambda *_: None)


def test_to_stops_early(chain, tmp_path):
    out = tmp_path / "run"
    run_chain({"profile": "t", "message": "m"}, out=out, stop=0, notebook_dir=chain, log=lambda *_: None)
    assert (out / "step0.txt").exists() and not (out / "step1.txt").exists()


def test_copied_and_edited_profile(tmp_path, chain):
    base = load_profile("smoke")
    assert base["profile"] == "smoke" and base["phantom_patients"] < load_profile("demo")["phantom_patients"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": "smoke", "message": "from my profile", "fail": False}))
    prof = load_profile(str(mine))
    assert prof["profile"] == "mine" and prof["message"] == "from my profile"
    assert prof["image_size"] == base["image_size"]
    out = tmp_path / "run"
    run_chain(str(mine), out=out, notebook_dir=chain, log=lambda *_: None)
    assert (out / "step0.txt").read_text() == "from my profile"


def test_every_packaged_profile_loads():
    for name in ("smoke", "demo", "paper"):
        p = load_profile(name)
        assert p["profile"] == name and "seed" in p
    assert load_profile("paper")["model_scale"] == "paper"


def test_unknown_profile_and_secret_keys_are_refused(tmp_path, chain):
    with pytest.raises(FileNotFoundError, match="no profile named"):
        load_profile("nonexistent")
    with pytest.raises(ChainError, match="secrets never pass as notebook parameters"):
        run_chain({"profile": "t", "openai_api_key": "sk-x"}, out=tmp_path / "r", notebook_dir=chain)


def test_discovers_the_real_chain():
    steps = discover_steps()
    numbers = [s.number for s in steps]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_notebook_helpers_figures_models_and_sampler(tmp_path):
    run = tmp_path / "run"
    assert figures_folder(run, "") == run / "figures"
    assert figures_folder(run, tmp_path / "figs") == tmp_path / "figs"
    assert figures_folder("runs/x", "figures") == resolve("figures")
    assert model_names("demo") == DEMO_MODELS
    assert model_names("paper") == ["sd15", "ip2p", *DEMO_MODELS]
    assert sampler_settings(run, "dpm", 4, 7.5, 2) == dict(steps=4, scheduler="dpm", text_scale=7.5, image_scale=2.0,
                                                           strength=1.0, output="decoded", text_guidance_min_t=0.0,
                                                           edit_mask=0.0)
    assert sampler_settings(run, "dpm", 4, 7.5, 2, 0.7)["strength"] == 0.7
    assert sampler_settings(run, "dpm", 4, 7.5, 2, 0.7, "prior_plus_change")["output"] == "prior_plus_change"
    assert sampler_settings(run, "dpm", 4, 7.5, 2, 0.7, "decoded", 0.3)["text_guidance_min_t"] == 0.3
    assert sampler_settings(run, "dpm", 4, 7.5, 2, 0.7, "decoded", 0.0, 3)["edit_mask"] == 3.0
    with pytest.raises(FileNotFoundError, match="notebook 05 chooses them"):
        sampler_settings(run, "dpm", 4, "auto", 1.5)
    (run / "05_stage2" / "guidance").mkdir(parents=True)
    (run / "05_stage2" / "guidance" / "guidance.json").write_text(json.dumps({"text_scale": 3.0, "image_scale": 2.5}))
    assert sampler_settings(run, "ddim", 20, "auto", "auto") == dict(steps=20, scheduler="ddim", text_scale=3.0,
                                                                      image_scale=2.5, strength=1.0,
                                                                      output="decoded", text_guidance_min_t=0.0,
                                                                      edit_mask=0.0)
    assert sampler_settings(run, "ddim", 20, 4.5, "auto")["text_scale"] == 4.5
