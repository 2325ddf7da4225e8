"""Notebook 03 through the chain runner against a loopback OpenAI-compatible server, with an API key in
the environment: the key authenticates the requests but appears nowhere in the run folder (executed
notebook, its metadata, the step log, chain.json, the answer cache, the outputs)."""
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd

from bmjlib.chain import load_profile, run_chain
from bmjlib.testing import ChatServer
from bmjlib.text.progression import loopback_model

KEY = "sk-test-NB03-SECRET-9f8e7d6c5b4a"
ROOT = Path(__file__).resolve().parent.parent


def _pairs():
    reports = [("Small left pleural effusion.", "Small left effusion."),
               ("Compared to ___, the left pleural effusion has increased, now moderate.", "Moderate left effusion."),
               ("Moderate left pleural effusion. New small right pneumothorax.", "New right pneumothorax."),
               ("The right pneumothorax has resolved. Mild cardiomegaly.", "Resolved right pneumothorax.")]
    rows = []
    for i, (a, b) in enumerate(zip(reports, reports[1:])):
        rows.append({"pair_id": f"10000001_5000000{i}_5000000{i + 1}", "subject_id": "10000001", "split": "train",
                     "prior_dicom_id": f"d{i}", "followup_dicom_id": f"d{i + 1}", "prior_study_id": f"5000000{i}",
                     "followup_study_id": f"5000000{i + 1}", "prior_path": "", "followup_path": "",
                     "prior_findings": a[0], "prior_impression": a[1], "followup_findings": b[0],
                     "followup_impression": b[1], "age": 70, "sex": "F", "race": "WHITE"})
    return pd.DataFrame(rows)


def test_notebook03_compatible_backend_key_never_written(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    shutil.copy(ROOT / "notebooks" / "03_descriptions.ipynb", nbdir)
    run = tmp_path / "run"
    (run / "02_registration").mkdir(parents=True)
    _pairs().to_csv(run / "02_registration" / "pairs.csv", index=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ChatServer(loopback_model) as srv:
        profile = load_profile("smoke")
        # credentialed source on purpose: the guard must let it through to loopback only
        profile.update(source="mimic", llm_backend="compatible", llm_model="loopback-model",
                       llm_base_url=srv.base_url, llm_bench_offline=200, llm_bench_api=4, llm_concurrency=2)
        run_chain(profile, out=run, notebook_dir=nbdir, log=lambda *_: None)
        assert srv.calls == 3  # one request per pair, through the real openai client
        assert set(srv.auth_sha256) == {hashlib.sha256(f"Bearer {KEY}".encode()).hexdigest()}

    meta = json.loads((run / "03_descriptions" / "run.json").read_text())
    assert (meta["backend"], meta["source"], meta["calls"], meta["described"]) == ("compatible", "mimic", 3, 3)
    assert meta["decision"].startswith("allowed: mimic text to a server on this machine")
    out = pd.read_csv(run / "03_descriptions" / "pairs.csv")
    assert list(out.description) == ["Left pleural effusion increased to moderate.",
                                     "New small right pneumothorax and unchanged moderate left pleural effusion.",
                                     "New mild cardiomegaly and resolved right pneumothorax."]
    executed = (run / "notebooks" / "03_descriptions.ipynb").read_text()
    assert "Left pleural effusion increased to moderate." in executed
    files = [f for f in run.rglob("*") if f.is_file()]
    assert any(f.suffix == ".log" for f in files) and any(f.name == "llm_cache.jsonl" for f in files)
    for f in files:
        assert KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
