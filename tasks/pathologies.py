"""The one list of pathologies, and the label columns of MIMIC-CXR's CheXpert/NegBio CSVs.

Every stage refers to classes by these names; nothing else in the project spells them out.
"""

# The 10 classes the classifier predicts and the generator is balanced over.
PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

# All 14 label columns of mimic-cxr-2.0.0-{chexpert,negbio}.csv.gz, in the source's order.
# Values: 1.0 positive, 0.0 negative, -1.0 uncertain, empty (null) not mentioned.
CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

assert set(PATHOLOGIES) <= set(CHEXPERT_LABELS)


def column_name(pathology: str) -> str:
    """SQL/Parquet-safe column name for a label: 'Pleural Effusion' -> 'pleural_effusion'."""
    return pathology.lower().replace(" ", "_")
