"""Words for the demo cohort: slide reports, WSI-VQA and PathVQA-style questions, PatchGastric-style captions.

Every informative word is decided by a hidden variable (label, grade, tumour extent); the rest varies at random
from a seeded generator, so a report/VQA model must read the features to score well, and cannot by memorising
one template.
"""

from __future__ import annotations

import numpy as np

DIAGNOSIS = {"benign": "benign breast tissue", "ductal": "invasive ductal carcinoma",
             "lobular": "invasive lobular carcinoma"}
_PATTERN = {
    "benign": "the ducts are lined by bland epithelium with an intact myoepithelial layer",
    "ductal": "the tumour forms cohesive nests of large pleomorphic nuclei with prominent nucleoli",
    "lobular": "the tumour cells are discohesive and infiltrate in single file",
}
_STROMA = {
    1: "dense collagenous stroma with fine ordered fibres and sparse lymphocytes",
    2: "moderately disordered stroma with scattered lymphocytes",
    3: "disordered myxoid stroma with a dense lymphocytic infiltrate",
}
_LYMPH = {1: "sparse", 2: "moderate", 3: "dense"}
_OPENINGS = ("sections show breast tissue.", "the specimen consists of breast tissue.",
             "microscopic examination shows breast parenchyma.")
_CLOSINGS = ("", " clinical correlation is recommended.", " see the synoptic report.")


def extent(tumour_fraction: float) -> str:
    """Tumour extent word: what share of the tissue the tumour regions cover."""
    return "focal" if tumour_fraction < 0.2 else "extensive"


def report(rng: np.random.Generator, label: str, grade: int, tumour_fraction: float) -> str:
    """A slide report: opening (random), diagnosis and pattern (label), extent (tumour fraction), stroma and
    grade (grade), closing (random)."""
    parts = [str(rng.choice(_OPENINGS))]
    if label == "benign":
        parts.append("there is no evidence of invasive carcinoma.")
    else:
        parts.append(f"there is {extent(tumour_fraction)} {DIAGNOSIS[label]}.")
    parts.append(f"{_PATTERN[label]}.")
    parts.append(f"the background shows {_STROMA[grade]}. overall grade {grade}.")
    return " ".join(parts) + str(rng.choice(_CLOSINGS))


def wsi_questions(label: str, grade: int) -> list[dict[str, str]]:
    """Closed WSI-VQA questions (yes/no and multiple choice) with their answer set."""
    diag = "|".join(DIAGNOSIS.values())
    return [
        dict(question="what is the histologic diagnosis?", answer=DIAGNOSIS[label], choices=diag),
        dict(question="is invasive carcinoma present?", answer="no" if label == "benign" else "yes",
             choices="yes|no"),
        dict(question="is this a lobular carcinoma?", answer="yes" if label == "lobular" else "no",
             choices="yes|no"),
        dict(question="what is the overall grade?", answer=str(grade), choices="1|2|3"),
        dict(question="how dense is the lymphocytic infiltrate?", answer=_LYMPH[grade],
             choices="|".join(_LYMPH.values())),
    ]


def roi_questions(label: str, grade: int) -> list[dict[str, str]]:
    """PathVQA-style questions about one ROI tile (`label` is the tile's own class: normal/ductal/lobular)."""
    what = "benign breast tissue" if label == "normal" else DIAGNOSIS[label]
    return [
        dict(question="is there carcinoma in this image?", answer="no" if label == "normal" else "yes"),
        dict(question="what does this image show?", answer=what),
        dict(question="how dense is the lymphocytic infiltrate?", answer=_LYMPH[grade]),
    ]


def caption(rng: np.random.Generator, label: str, grade: int) -> str:
    """A PatchGastric-style caption of one ROI tile: the tile's pattern, then its stroma."""
    if label == "normal":
        head = str(rng.choice(("benign breast tissue", "non-neoplastic breast tissue")))
    else:
        head = DIAGNOSIS[label] + (" with cohesive nests of large pleomorphic nuclei" if label == "ductal"
                                   else " with discohesive cells in single file")
    return f"{head}, in {_STROMA[grade]}."
