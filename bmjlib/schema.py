"""Shared vocabulary of the chain: CheXpert label columns, the paper's five findings, record columns.

Every data source (MIMIC-CXR-JPG layout, phantom, bring-your-own CSV, ICG-CXR) yields records with
these columns (paper §3, App. A.1), so the chain after notebook 01 does not know where data came from.
"""

# The 14 CheXpert observations, in the column order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
]

# The five findings the paper evaluates (Table 3 order: At, Ca, Ed, Ef, Px).
FINDINGS = ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax"]
FINDING_ABBREV = {"Atelectasis": "At", "Cardiomegaly": "Ca", "Edema": "Ed",
                  "Pleural Effusion": "Ef", "Pneumothorax": "Px"}

SIDES = ["left", "right", "bilateral"]

# One row per image. Labels are the 14 CHEXPERT_LABELS columns (1, 0, -1, NaN = blank).
RECORD_COLUMNS = [
    "source",          # "mimic" | "phantom" | "csv" | "icg"
    "subject_id",      # patient id (str)
    "study_id",        # study id (str)
    "dicom_id",        # image id (str), unique within the source
    "image_path",      # absolute path to the image file
    "view",            # "PA" | "AP" | "LATERAL" | "LL" | ... as recorded (may be wrong)
    "study_time",      # pandas Timestamp (or day offset converted to a Timestamp from an epoch)
    "partition",       # "p10".."p19" for MIMIC layout, else "" (split decided in cohort)
    "findings",        # FINDINGS section text ("" if absent)
    "impression",      # IMPRESSION section text ("" if absent)
    "report_path",     # path to the full report text, "" if none
    "age", "sex", "race",
]

# One row per (prior, follow-up) pair, written by notebook 01 and extended by 02 and 03.
PAIR_COLUMNS = [
    "pair_id",         # f"{subject_id}_{prior_study_id}_{followup_study_id}"
    "subject_id", "split",                # split: "train" | "val" | "test"
    "prior_dicom_id", "followup_dicom_id",
    "prior_study_id", "followup_study_id",
    "prior_path", "followup_path",
    "prior_findings", "prior_impression", "followup_findings", "followup_impression",
    "age", "sex", "race",
    # plus prior_<label> and followup_<label> for each of the 14 CHEXPERT_LABELS
]


def label_col(prefix: str, label: str) -> str:
    """Column name of one CheXpert label in a pair table, e.g. ('followup', 'Edema') -> 'followup_Edema'."""
    return f"{prefix}_{label}"

# Short keys for the five findings in ground-truth tables and code (severity columns etc.).
FINDING_KEYS = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Edema": "edema",
                "Pleural Effusion": "effusion", "Pneumothorax": "pneumothorax"}
# Severity grades used everywhere (phantom truth, report extractor, interpretation): 0 = absent.
SEVERITY_WORDS = {1: "small", 2: "moderate", 3: "large"}  # per finding, reports vary the wording
# The real radiographs of ../shared/real_cxr/hannover (CC BY 3.0): every figure or view that shows one says this.
HANNOVER_ATTRIBUTION = ("Hannover Medical School, Inst. Diagnostic & Interventional Radiology; "
                        "DOI 10.6084/m9.figshare.12275009; CC BY 3.0")
# Organ masks of the paper's Fig. 5 (phantom truth and the anatomy-segmentation judge), in this order.
ORGANS = ["left_lung", "right_lung", "heart", "mediastinum", "diaphragm", "spine"]
