"""The packaged real-data profile `hannover`: a bring-your-own cohort without reports or labels, run end to end
through the chain on the shipped demo model (bmjlib/profiles/hannover.yaml)."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from bmjlib.chain import run_chain  # noqa: E402
from bmjlib.io import CREDIT_ENV, save_figure  # noqa: E402
from bmjlib.model.demo_model import resolve_model  # noqa: E402
from bmjlib.model.pipeline import read_guidance  # noqa: E402
from bmjlib.runtime import load_profile, repo_root  # noqa: E402
from bmjlib.schema import HANNOVER_ATTRIBUTION  # noqa: E402
from bmjlib.text.progression import NO_REPORT_DESCRIPTION, describe_pairs  # noqa: E402

HANNOVER = repo_root().parent / "shared" / "real_cxr" / "hannover"
needs_images = pytest.mark.skipif(not (HANNOVER / "data.csv").is_file(), reason="../shared/real_cxr/hannover absent")


def test_the_profile_names_a_trained_model_a_csv_cohort_and_the_attribution():
    p = load_profile("hannover")
    assert p["model"] == "demo" and p["source"] == "csv" and p["views"] == "PA,AP" and "last_step" not in p
    assert p["figures_dir"] == "" and p["manifest_dir"] == "" and p["data_credentialed"] is False
    assert p["figure_credit"] == HANNOVER_ATTRIBUTION and "CC BY 3.0" in p["figure_credit"]
    cohort = pd.read_csv(repo_root() / p["data_root"], dtype=str)
    assert list(cohort.columns) == ["patient", "image", "day", "view", "sex"] and len(cohort) == 48
    assert set(cohort["view"]) == {"AP", "PA"}


def test_the_runner_accepts_the_profile_and_a_boolean_data_credentialed():
    from bmjlib.chain import ChainError, check_profile, discover_steps, notebook_parameters

    params = {s.stem: notebook_parameters(s.path) for s in discover_steps()}
    check_profile(load_profile("hannover"), params)  # data_credentialed: false (a real boolean) included
    with pytest.raises(ChainError, match="llm_data_use_override: 'false' must be true or false"):
        check_profile({"llm_data_use_override": "false"}, params)


def test_every_saved_figure_carries_the_run_credit_once(tmp_path, monkeypatch):
    monkeypatch.setenv(CREDIT_ENV, HANNOVER_ATTRIBUTION)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(fig, tmp_path, "a", formats=("png",))
    save_figure(fig, tmp_path, "a", formats=("png",))
    assert [t.get_text() for t in fig.texts] == [HANNOVER_ATTRIBUTION]
    fig2, _ = plt.subplots()
    fig2.text(0.5, 0.0, "Images: " + HANNOVER_ATTRIBUTION)  # a figure that credits its images already
    save_figure(fig2, tmp_path, "b", formats=("png",))
    assert len(fig2.texts) == 1
    monkeypatch.delenv(CREDIT_ENV)
    fig3, _ = plt.subplots()
    save_figure(fig3, tmp_path, "c", formats=("png",))
    assert fig3.texts == []
    plt.close("all")


def test_a_cohort_without_reports_gets_the_no_change_hypothesis():
    cols = ["prior_findings", "prior_impression", "followup_findings", "followup_impression"]
    base = {"pair_id": ["a", "b"], "prior_path": ["x", "y"], "followup_path": ["x", "y"], "source": "csv",
            "credentialed": False}
    empty = pd.DataFrame({**base, **{c: ["", ""] for c in cols}})
    res = describe_pairs(empty, source="csv", progress=False, credentialed=False)
    assert list(res.pairs["description"]) == [NO_REPORT_DESCRIPTION] * 2 and res.failures.empty
    some = empty.assign(followup_impression=["Small left pleural effusion.", ""],
                        prior_impression=["No effusion.", ""])
    res = describe_pairs(some, source="csv", progress=False, credentialed=False)
    assert list(res.pairs["pair_id"]) == ["a"] and list(res.failures["pair_id"]) == ["b"]  # a missing report fails


@pytest.mark.slow
@needs_images
def test_the_hannover_profile_runs_end_to_end_through_the_runner(tmp_path, monkeypatch):
    """Steps 00-10 on the real Hannover cohort with the shipped model, shrunk where the
    profile's numbers only buy precision (registration size, judge epochs, probes, bootstrap)."""
    monkeypatch.chdir(repo_root())
    mine = tmp_path / "small_hannover.yaml"
    mine.write_text(yaml.safe_dump({"base": "hannover", "reg_size": 128, "real_pairs": 2,
                                    "judge_epochs": 1, "probe_priors": 1, "sample_steps": 4, "bootstrap": 20,
                                    "llm_bench_offline": 200, "llm_bench_api": 4}))
    figures_before = sorted(p.name for p in (repo_root() / "figures").iterdir())
    run = run_chain(str(mine), out=tmp_path / "run", log=lambda *_: None)

    assert sorted(p.name for p in (repo_root() / "figures").iterdir()) == figures_before
    figs = run / "figures"
    assert (figs / "fig4_models.png").is_file() and (figs / "table_validity.md").is_file()
    assert sorted(p.name for p in (run / "04_stage1").iterdir()) == ["given_model.json"]
    given = json.loads((run / "05_stage2" / "given_model.json").read_text())
    shipped = read_guidance(resolve_model("demo"))                     # the shipped model's own default
    assert given["model"] == "demo" and given["guidance"] == list(shipped)
    chosen = json.loads((run / "05_stage2" / "guidance" / "guidance.json").read_text())
    assert (chosen["text_scale"], chosen["image_scale"]) == shipped
    skipped = json.loads((run / "05_stage2" / "judges" / "skipped.json").read_text())
    assert skipped["skipped"] == ["finding", "sex", "age", "severity"]
    assert not any((run / "08_ablations").iterdir())
    pairs = pd.read_csv(run / "03_descriptions" / "pairs.csv")
    assert set(pairs["description"]) == {NO_REPORT_DESCRIPTION} and set(pairs["credentialed"]) == {False}
    summary = pd.read_csv(run / "06_generate" / "summary.csv").set_index("model")["status"]
    assert summary["biomedjourney"] == "ok" and summary["one_stage"].startswith("missing")
    v = pd.read_csv(run / "07_evaluate" / "validity.csv").set_index("source")
    assert np.isfinite(v.loc["biomedjourney", "null_edit_ssim"]) and np.isfinite(v.loc["biomedjourney",
                                                                                         "reversibility_ssim"])
    assert np.isnan(v.loc["biomedjourney", "effectiveness"]) and "truth" not in v.index  # no labels, no truth
    assert np.isfinite(v.loc["copy_prior", "null_edit_ssim"]) and np.isnan(v.loc["copy_prior", "pathology_auroc"])
    state = json.loads((run / "chain.json").read_text())
    assert sorted(state)[-1] == "10_interpret" and len(state) == 11
    # step 10: no organ masks on these images (no phantom truth, no anatomy judge), so nothing is interpreted,
    # said in the notebook; every registered pair is still exported in the ICG-CXR format and read back
    assert "not interpreted: the interpretation measures changes inside organ masks" in \
        (run / "notebooks" / "10_interpret.ipynb").read_text()
    registered = pairs["registered_path"].fillna("").astype(bool).sum()
    assert len(list((run / "10_icg" / "icg_cxr").rglob("*.json"))) == registered > 0


def test_a_phantom_beside_another_cohort_lends_it_no_truth(tmp_path):
    """Organ masks and directions from a run's phantom truth count only for that phantom's own images: a cohort of
    other images without judges is told what is missing, never measured with another patient's masks."""
    from bmjlib.icg.interpret_run import run_interpretation

    run = tmp_path / "run"
    (run / "00_phantom" / "truth" / "masks").mkdir(parents=True)
    np.savez(run / "00_phantom" / "truth" / "masks" / "phantom1.npz", left_lung=np.ones((8, 8), bool))
    pd.DataFrame({"dicom_id": ["phantom1"]}).to_csv(run / "00_phantom" / "truth" / "images.csv", index=False)
    (run / "03_descriptions").mkdir()
    pd.DataFrame({"pair_id": ["p_a_b"], "subject_id": ["p"], "split": ["test"], "prior_dicom_id": ["a"],
                  "followup_dicom_id": ["b"], "prior_path": ["a.png"], "followup_path": ["b.png"],
                  "description": [NO_REPORT_DESCRIPTION]}).to_csv(run / "03_descriptions" / "pairs.csv", index=False)
    tables = run_interpretation(run, run / "10_icg")
    assert not tables["interpreted"] and "this run has neither (judges: none)" in tables["why"]
    assert tables["sentences"].empty and tables["summary"].empty
