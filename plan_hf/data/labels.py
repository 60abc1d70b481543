"""Label vocabularies of the published chest X-ray datasets, shared by the loaders, the synthetic set and evaluation."""

# The 14 CheXpert observations, in the column order of mimic-cxr-2.0.0-chexpert.csv and CheXpert's train.csv.
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
# The five classes of the CheXpert 5x200 zero-shot / retrieval protocol.
CHEXPERT_5X200_CLASSES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# MS-CXR's eight phrase-grounding categories.
MS_CXR_CATEGORIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

__all__ = ["CHEXPERT_5X200_CLASSES", "CHEXPERT_LABELS", "MS_CXR_CATEGORIES"]
