"""Tables: formatting with intervals, paper columns beside ours, CSV + Markdown (bmjlib.evaluation.tables)."""
import numpy as np
import pandas as pd
import pytest

from bmjlib.evaluation import tables as T
from bmjlib.io import markdown_table, write_table
from bmjlib.schema import FINDINGS


def summary():
    rows = []
    for s, v in (("biomedjourney", 0.8), ("copy_prior", 0.6), ("reference", 0.9)):
        r = {"source": s, "pathology_auroc": v, "pathology_auroc_lo": v - 0.05, "pathology_auroc_hi": v + 0.05,
             "changed_auroc": v - 0.3, "retention_auroc": 0.95, "age_r": 0.7, "cmig": 0.8, "cmig_changed": 0.6,
             "kl": 0.01, "dice_vs_reference": 0.85, "dice_vs_prior": 0.9, "ssim": 0.7, "ms_ssim": np.nan, "psnr": 25.0}
        r.update({f"auroc_{f}": v for f in FINDINGS})
        r.update({f"changed_{f}": np.nan for f in FINDINGS})
        rows.append(r)
    return pd.DataFrame(rows)


def test_fmt_interval_and_undefined():
    row = {"x": 0.8054, "x_lo": 0.77, "x_hi": 0.83}
    assert T.fmt(row, "x") == "80.5 [77.0, 83.0]"
    assert T.fmt({"x": 0.5}, "x") == "50.0"
    assert T.fmt({"x": np.nan}, "x") == "-" and T.fmt({}, "x") == "-"


def test_table1_puts_paper_numbers_beside_ours_by_model():
    t1 = T.table1(summary()).set_index("Model")
    bj = t1.loc["BiomedJourney (two-stage)"]
    assert bj["Pathology AUROC"] == "80.0 [75.0, 85.0]"
    assert bj["CMIG paper (MIMIC-CXR)"] == "83.23" and bj["Race AUC paper (MIMIC-CXR)"] == "97.22"
    assert t1.loc["Copy prior", "CMIG paper (MIMIC-CXR)"] == ""  # no paper row for copy-the-prior


def test_table1_gives_the_paired_cmig_differences():
    sm = summary()
    sm.loc[0, ["cmig_minus_copy_prior", "cmig_minus_copy_prior_lo", "cmig_minus_copy_prior_hi"]] = 0.039, 0.012, 0.066
    t1 = T.table1(sm).set_index("Model")
    assert t1.loc["BiomedJourney (two-stage)", "CMIG minus copy prior (paired)"] == "3.9 [1.2, 6.6]"
    assert t1.loc["Copy prior", "CMIG minus copy prior (paired)"] == "-"  # not against itself
    assert (t1["CMIG minus one-stage (paired)"] == "-").all()  # no one-stage arm in this run


def test_table3_and_4_and_fidelity():
    t3 = T.table3(summary()).set_index("Source")
    assert t3.loc["BiomedJourney (two-stage)", "KL paper (MIMIC-CXR)"] == "10.90"
    assert t3.loc["BiomedJourney (two-stage)", "Ef"] == "80.0"
    assert (T.table3_changed(summary())["Ef"] == "-").all()
    t4 = T.table4(summary()).set_index("Model")
    assert t4.loc["Reference image (real follow-up)", "Dice paper (MIMIC-CXR)"] == "74.04"
    tf = T.fidelity_table(summary()).set_index("Model")
    assert tf.loc["Copy prior", "PSNR (dB)"] == "25.00" and tf.loc["Copy prior", "MS-SSIM"] == "-"


def test_paper_cmig_is_not_reproducible_from_its_columns():
    chk = T.paper_cmig_check().set_index("model")
    assert chk.loc["BiomedJourney", "recomputed"] == pytest.approx(84.11, abs=0.01)
    assert chk.loc["BiomedJourney", "paper CMIG"] == 83.23


def test_write_table_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": [0.5, np.nan]})
    csv, md = write_table(df, tmp_path, "t", "Caption here.", note="\nA note.\n")
    assert md.read_text() == ("Caption here.\n\n| a | b | c |\n|---|---|---|\n| 1 | x | 0.500 |\n| 2 | y |  |\n"
                              "\nA note.\n")
    assert pd.read_csv(csv).equals(df)
    assert markdown_table(df, floatfmt="{:g}").splitlines()[2] == "| 1 | x | 0.5 |"
