"""ICG-CXR as a data source of the chain (ProgEmu / ICG-CXR, DESIGN "Data sources" 3): a folder in the published
format, built from the real Hannover radiographs with every key of the published JSON, read as registered pairs
with their own descriptions, written back without loss, and run through steps 00-10 by the chain runner."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bmjlib.data import icg
from bmjlib.data.icg import REG_METRIC_COLUMN, read_icg, write_icg
from bmjlib.schema import CHEXPERT_LABELS, label_col

HANNOVER = Path(__file__).resolve().parent.parent.parent / "shared" / "real_cxr" / "hannover"
needs_hannover = pytest.mark.skipif(not HANNOVER.exists(), reason="../shared/real_cxr/hannover not present")

# The reports' text in ICG-CXR's CheXpertPlus branch (the licence forbids redistributing them).
PLACEHOLDER = ("Due to the CheXpertPlus license, we are unable to redistribute the CXR data. Please see "
               "`process_chexpertplus.ipynb` for retrieving these data from the CheXpertPlus dataset.")
# The keys of the published example JSON (ProgEmu's process_chexpertplus.ipynb), in its order.
PUBLISHED_KEYS = ["changes-of-findings", "progression-description", "comment", "reference-report", "followup-report",
                  "time-interval", "view", "subject-id", "reference-study-id", "followup-study-id",
                  "reference-dicom-id", "followup-dicom-id", "reference-study-order", "followup-study-order",
                  "reference-study-index", "followup-study-index", "reference-narrative", "followup-narrative",
                  "age", "sex", "race", "ethnicity", "recent_bmi", "deceased", "split", "reg_metric",
                  "reference-diseases", "followup-diseases"]
# Hannover patient -> (ICG-CXR branch, split as the source writes it): the MIMIC branch carries report text
# (stage 1 trains on it), the CheXpertPlus branch the placeholder; "valid" is CheXpert's name for validation.
PATIENTS = {"9fc85fab": ("mimic_cxr", "train"), "663cea67": ("mimic_cxr", "train"), "8cb68566": ("chexpertplus", "train"),
            "c62c878a": ("chexpertplus", "train"), "530a29b3": ("mimic_cxr", "validate"),
            "77a9d3bc": ("chexpertplus", "valid"), "177330aa": ("chexpertplus", "test"),
            "6ac9bfff": ("mimic_cxr", "test")}
CHANGES = ["Increased bilateral patchy opacities in the lower lungs.", "Decreased opacity in the right lower lung.",
           "New small left pleural effusion.", "Stable bilateral airspace opacities.",
           "Worsening consolidation in the left lower lobe."]
FINDINGS_TEXT = ["Patchy bilateral opacities, worse at the bases. Lines and tubes in place.",
                 "Bilateral airspace opacities. No pneumothorax.", "Endotracheal tube in place. Bibasal opacities."]


def _missing(**given):
    return {**{lab: -100 for lab in CHEXPERT_LABELS}, **given}


def make_icg_folder(root: Path, patients: dict = PATIENTS, labelled: bool = False) -> Path:
    """An ICG-CXR folder of Hannover's consecutive pairs (the real images at ICG-CXR's 512 x 512), one pair folder
    per pair, each JSON with every key of the published example; returns `root`. Labels as in the published
    example (-100 but "No Finding"), or with `labelled` some CheXpert labels of these COVID-19 patients."""
    data = pd.read_csv(HANNOVER / "data.csv", dtype=str)
    data["day"] = -pd.to_numeric(data["admission_offset"])
    hp = pd.read_csv(HANNOVER / "pairs.csv")
    k = 0
    for n, (pid, (branch, split)) in enumerate(patients.items()):
        imgs = data[data["patient_id"] == pid].sort_values(["day", "image_id"])
        rank = {i: j for j, i in enumerate(imgs["image_id"])}
        sex = {"m": "Male", "f": "Female"}[imgs["sex"].iloc[0]]
        mimic = branch == "mimic_cxr"
        subject = f"1{n}{n:06d}" if mimic else f"{n + 12:05d}"
        pairs = hp[hp["patient_id"] == pid]
        for _, r in pairs.iterrows():
            a, b = Path(r["prior_image"]).stem, Path(r["current_image"]).stem
            ia, ib = rank[a], rank[b]
            sa, sb = (f"5{n}{ia:06d}", f"5{n}{ib:06d}") if mimic else (f"{ia + 1:05d}", f"{ib + 1:05d}")
            name = f"i{ia + 1:02d}s{sa}-i{ib + 1:02d}s{sb}"
            folder = (root / branch / "pa" / "1" / f"p{subject[:2]}" / f"p{subject}" / name if mimic else
                      root / branch / "pa" / "1" / "train" / f"p{subject}" / name)
            folder.mkdir(parents=True)
            report = (lambda i: {"findings": FINDINGS_TEXT[i % 3], "impression": CHANGES[i % 5]}) if mimic else \
                (lambda i: {"findings": PLACEHOLDER, "impression": PLACEHOLDER})
            meta = {
                "changes-of-findings": f"Compared with the prior study: {CHANGES[k % 5].lower()}",
                "progression-description": CHANGES[k % 5],
                "comment": {"confidence": 3 + k % 3, "reason": "Clear and consistent observations."},
                "reference-report": report(k), "followup-report": report(k + 1),
                "time-interval": int(r["interval_days"]) if mimic else None,
                "view": str(r["prior_projection"]).upper(), "subject-id": subject,
                "reference-study-id": sa, "followup-study-id": sb,
                "reference-dicom-id": f"{a}-{sa}" if mimic else f"train/patient{subject}/study{ia + 1}/view1_frontal",
                "followup-dicom-id": f"{b}-{sb}" if mimic else f"train/patient{subject}/study{ib + 1}/view1_frontal",
                "reference-study-order": ia + 1, "followup-study-order": ib + 1,
                "reference-study-index": ia, "followup-study-index": ib,
                "reference-narrative": "\n**WARNING-NO SUMMARY CODE\n \n TWO VIEW CHEST:  18/28 \n \n ",
                "followup-narrative": "\nEXAM: Chest 2 Views, 8/3/2002\n \n",
                "age": 40.0 + 3 * n, "sex": sex, "race": "Other", "ethnicity": "Non-Hispanic/Non-Latino",
                "recent_bmi": 30.3 if k % 2 else None, "deceased": "Yes" if k % 4 == 0 else "No", "split": split,
                "reg_metric": [-100, 0, 2165.8680753770136][k % 3] if k < 3 else 1800.0 + 7.25 * k,
                "reference-diseases": _missing(**({"Lung Opacity": 1.0, "Edema": -1.0 if k % 3 == 0 else 0.0}
                                                  if labelled else {"No Finding": 1.0})),
                "followup-diseases": _missing(**({"Lung Opacity": 1.0 if k % 4 else 0.0,
                                                  "Pleural Effusion": 1.0 if k % 5 == 2 else 0.0}
                                                 if labelled else {"No Finding": 0.0})),
            }
            assert list(meta) == PUBLISHED_KEYS
            (folder / f"{name}.json").write_text(json.dumps(meta, indent=4, ensure_ascii=False))
            for src, kind in ((r["prior_image"], "ref"), (r["current_image"], "flu")):  # ICG-CXR: 512 x 512 PNG
                Image.open(HANNOVER / src).convert("L").resize((512, 512), Image.LANCZOS).save(
                    folder / f"{name}-{kind}-reg.png")
            k += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not HANNOVER.exists():
        pytest.skip("../shared/real_cxr/hannover not present")
    return make_icg_folder(tmp_path_factory.mktemp("icg") / "icg-cxr-v1")


def _jsons(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}


@needs_hannover
def test_pairs_are_read_as_registered_with_their_own_metric_and_no_invented_time(folder):
    rec, pairs, skipped = read_icg(folder)
    assert skipped.empty and len(pairs) == 57 and len(_jsons(folder)) == 57
    p = pairs.set_index("icg_folder")
    one = p.loc["chexpertplus/pa/1/train/p00014/i01s00001-i02s00002"]   # 8cb68566's first pair
    # ProgEmu's mean squares in its own column; -100 (not registered) is missing; the chain's score is not invented
    assert pairs[REG_METRIC_COLUMN].isna().sum() == 1 and (pairs[REG_METRIC_COLUMN] == 0).sum() == 1
    assert pairs["reg_score"].isna().all()
    assert one["registered_path"] == one["followup_path"] and one["registered_path"].endswith("-flu-reg.png")
    assert one["description"] in CHANGES and one["prior_findings"] == "" and one["credentialed"]
    # dates ICG-CXR does not give stay unknown (also where time-interval is given); the orders are kept
    assert rec["study_time"].isna().all()
    assert (one["prior_study_order"], one["followup_study_order"]) == (1, 2)
    # the dataset's split names become the chain's; the branch gives the origin
    assert set(pairs["split"]) == {"train", "val", "test"}
    assert set(pairs["icg_origin"]) == {"mimic", "chexpertplus"}


@needs_hannover
def test_read_write_read_keeps_every_key_value_and_folder(folder, tmp_path):
    _, pairs, _ = read_icg(folder)
    out = write_icg(pairs, tmp_path / "back")
    assert len(out) == 57
    before, after = _jsons(folder), _jsons(tmp_path / "back")
    assert list(after) == list(before)                       # the same folder names and paths
    for rel, meta in before.items():
        assert after[rel] == meta, rel                       # every key and value, unknown keys included
        assert list(after[rel]) == list(meta)                # in their order
    some = next(r for r, m in before.items() if m["reference-report"]["findings"] == PLACEHOLDER)
    assert after[some]["followup-report"]["impression"] == PLACEHOLDER
    for png in folder.rglob("*.png"):                        # images byte for byte
        assert (tmp_path / "back" / png.relative_to(folder)).read_bytes() == png.read_bytes()
    # through a CSV, as the chain passes pairs from step to step, and back again: still identical
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    again = pd.read_csv(tmp_path / "pairs.csv")
    write_icg(again, tmp_path / "via_csv")
    assert _jsons(tmp_path / "via_csv") == before
    _, back, _ = read_icg(tmp_path / "back")
    cols = [c for c in pairs.columns if not c.endswith("_path") and c not in ("icg_json",)]
    pd.testing.assert_frame_equal(back[cols], pairs[cols])


@needs_hannover
def test_a_changed_value_is_written_and_nothing_else(folder, tmp_path):
    _, pairs, _ = read_icg(folder)
    pairs = pairs.head(2).copy()
    pairs.loc[0, "description"] = "Larger left pleural effusion."
    pairs.loc[0, label_col("followup", "Pleural Effusion")] = 1.0
    interp = pd.DataFrame({"pair_id": [pairs.loc[1, "pair_id"]], "changes_of_findings": ["The opacity is larger."]})
    out = write_icg(pairs, tmp_path / "w", interpretations=interp)
    first, second = (json.loads(Path(j).read_text()) for j in out["json"])
    orig = [json.loads(Path(j).read_text()) for j in pairs["icg_json"]]
    assert first["progression-description"] == "Larger left pleural effusion."
    assert first["followup-diseases"]["Pleural Effusion"] == 1.0 and first["followup-diseases"]["Edema"] == -100
    assert {k: v for k, v in first.items() if k not in ("progression-description", "followup-diseases")} == \
        {k: v for k, v in orig[0].items() if k not in ("progression-description", "followup-diseases")}
    assert second == {**orig[1], "changes-of-findings": "The opacity is larger."}


@needs_hannover
def test_origin_comes_from_the_rows_never_from_a_default(folder, tmp_path):
    _, pairs, _ = read_icg(folder)
    cxp = pairs[pairs["icg_origin"] == "chexpertplus"].head(1)
    write_icg(cxp.drop(columns=["icg_meta", "icg_folder"]), tmp_path / "new")   # written as a new pair
    assert (tmp_path / "new" / "chexpertplus").is_dir() and not (tmp_path / "new" / "phantom").exists()
    _, back, _ = read_icg(tmp_path / "new")
    assert back["credentialed"].all() and back["icg_origin"].tolist() == ["chexpertplus"]
    # a table that does not say where its rows come from: an error naming the problem, nothing written
    bare = cxp.drop(columns=["icg_meta", "icg_folder", "icg_origin", "source"])
    with pytest.raises(ValueError, match=r"1 of 1 pairs have no origin .*pass origin="):
        write_icg(bare, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match=r"origin 'phantom' given, but 1 pairs say they come from elsewhere"):
        write_icg(cxp, tmp_path / "wrong", origin="phantom")
    # a credentialed CSV row stays credentialed through the export (origin csv is otherwise open data)
    csv_rows = bare.assign(source="csv", credentialed=True)
    write_icg(csv_rows, tmp_path / "csv")
    assert read_icg(tmp_path / "csv")[1]["credentialed"].all()


@needs_hannover
def test_steps_02_and_03_take_the_pairs_as_registered_and_described(folder, tmp_path):
    from bmjlib.data.cohort import build_cohort, write_cohort
    from bmjlib.data.sources import load_source

    c = build_cohort(load_source("icg", folder))                   # require_positive on, as in every profile
    n_pa = int((pd.read_csv(HANNOVER / "pairs.csv")["prior_projection"] == "pa").sum())
    assert c.positive_filter == "not applicable" and len(c.pairs) == n_pa > 0   # PA pairs only (views: PA)
    assert set(c.records.loc[c.records["subject_id"] == c.pairs["subject_id"].iloc[0], "split"]) == \
        set(c.pairs.loc[c.pairs["subject_id"] == c.pairs["subject_id"].iloc[0], "split"])  # the dataset's split
    c = build_cohort(load_source("icg", folder), views="frontal")
    assert len(c.pairs) == 57
    run = tmp_path / "run"
    write_cohort(c, run / "01_cohort")
    pairs = pd.read_csv(run / "01_cohort" / "pairs.csv", dtype=str)
    reg, kept = icg.registration_table(pairs)
    assert (reg["status"] == "ok").all() and reg["reason"].str.contains("not registered again").all()
    assert reg["score_after"].isna().all() and list(kept.columns) == list(pairs.columns)
    (run / "02_registration").mkdir()
    kept.to_csv(run / "02_registration" / "pairs.csv", index=False)
    res = icg.description_step(run)
    out = pd.read_csv(run / "03_descriptions" / "pairs.csv")
    assert list(out.columns).count("description") == 1 and res.calls == 0
    own = {p: json.loads(Path(j).read_text())["progression-description"] for p, j in zip(pairs["pair_id"], pairs["icg_json"])}
    assert out.set_index("pair_id")["description"].to_dict() == own
    assert json.loads((run / "03_descriptions" / "run.json").read_text())["backend"] == "dataset"
    with pytest.raises(ValueError, match="not an ICG-CXR pair"):
        icg.registration_table(pairs.assign(source="csv"))


@needs_hannover
@pytest.mark.slow
def test_chain_runs_on_an_icg_folder_and_writes_it_back(tmp_path):
    """Steps 00-10 through the runner. Step 10's interpretation measures inside organ masks, which a run on real
    images takes from the anatomy judge; an ICG-CXR run on the shipped model has none (labels of CheXpertPlus are
    not the finding judges' training data), so step 10 says it interprets nothing and exports the run's pairs with
    their own changes-of-findings."""
    from bmjlib.chain import run_chain

    folder = make_icg_folder(tmp_path / "icg-cxr-v1", labelled=True)
    profile = tmp_path / "icg.yaml"
    # the smoke profile on ICG-CXR, all its (mostly AP) pairs; shorter where it only buys precision: the shipped
    # model instead of training one, no real-pair registration figure, one probe prior
    profile.write_text(f"base: smoke\nsource: icg\ndata_root: {folder}\nviews: frontal\nmodel: demo\n"
                       "real_cxr_dir: ''\nprobe_priors: 1\nllm_bench_offline: 200\nllm_bench_api: 4\n")
    run = run_chain(str(profile), out=tmp_path / "run", log=lambda *_: None)
    state = json.loads((run / "chain.json").read_text())
    assert [k[:2] for k in state] == [f"{i:02d}" for i in range(11)]
    assert not (run / "00_phantom").exists()                           # no phantom cohort for an ICG-CXR run
    assert (run / "05_stage2" / "judges" / "phantom" / "truth").is_dir()  # only the demo judges' own
    nb = lambda n: (run / "notebooks" / n).read_text()
    assert "no phantom cohort is built" in nb("00_phantom.ipynb")
    assert "positive-finding filter (require_positive: true): 57 of 57" in nb("01_cohort.ipynb")
    reg = pd.read_csv(run / "02_registration" / "registration.csv")
    assert reg["reason"].str.contains("not registered again").all() and reg["score_after"].isna().all()
    assert not (run / "02_registration" / "registered").exists()
    d = pd.read_csv(run / "03_descriptions" / "pairs.csv")
    assert not any(c.endswith(("_x", "_y")) for c in d.columns) and list(d.columns).count("description") == 1
    own = {m["subject-id"] + "_" + m["reference-study-id"] + "_" + m["followup-study-id"]: m["progression-description"]
           for m in _jsons(folder).values()}
    assert d.set_index(d["pair_id"].astype(str))["description"].to_dict() == own
    assert json.loads((run / "03_descriptions" / "run.json").read_text())["calls"] == 0
    assert (run / "06_generate" / "biomedjourney").is_dir() and (run / "07_evaluate" / "validity.csv").is_file()
    # step 10's write-back of the run's pairs (through the CSVs of steps 01-03) with their own interpretations:
    # the same folders, every key and value of the source, only the chain's own columns added under bmj-extra
    assert "not interpreted: the interpretation measures changes inside organ masks" in nb("10_interpret.ipynb")
    source, back = _jsons(folder), _jsons(run / "10_icg" / "icg_cxr")
    assert list(back) == list(source)
    for rel, meta in source.items():
        assert {k: v for k, v in back[rel].items() if k != "bmj-extra"} == meta, rel


@pytest.mark.parametrize("source", ["icg", "csv"])
def test_step_00_builds_no_phantom_for_icg_or_csv(source, tmp_path):
    import papermill as pm

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "00.ipynb"
    pm.execute_notebook(str(root / "notebooks" / "00_phantom.ipynb"), str(out), cwd=str(root / "notebooks"),
                        parameters=dict(run_dir=str(tmp_path / "run"), source=source), progress_bar=False,
                        kernel_name="python3")
    assert f"source {source}: no phantom cohort is built" in out.read_text()
    assert not (tmp_path / "run" / "00_phantom").exists()
