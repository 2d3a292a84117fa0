"""What a table's labels are called: class names for the integer class ids a label column may hold.

A label is whatever the indexing job was given: a sidecar's text (already a name, shown as it is)
or an integer class id (MedMNIST sets, the medmnist-4 benchmark table). An id gets its name from,
in this order:

- MedMNIST's official class names (MedMNIST v2, ``INFO[...]["label"]``), for rows whose dataset is
  ``medmnist/<organ>`` (``breast``, ``retina``, ``chest``, ``abdomen``, or the file's stem such as
  ``medmnist/retinamnist``), shown with the organ: ``retina: grade 2``;
- the encoder's own names, ``EncoderConfig.extra["class_names"]``: a list (id -> its position) or a
  ``{id: name}`` mapping. (``extra["labels"]`` is a class count in encoders medret trains, not names.)

>>> names = LabelNames()
>>> names.name("2", "medmnist/retina"), names.name("0", "medmnist/breastmnist"), names.name("tumour", None)
('retina: grade 2', 'breast: malignant', None)
>>> LabelNames({"class_names": ["benign", "tumour"]}).name("1", "mine")
'tumour'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: the official class names of the medmnist-4 sets (MedMNIST v2); RetinaMNIST's are the DR severity grades 0-4
MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "breast": ("malignant", "normal, benign"),
    "retina": ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),
    "chest": ("normal", "pneumonia"),
    "abdomen": (
        "bladder",
        "femur-left",
        "femur-right",
        "heart",
        "kidney-left",
        "kidney-right",
        "liver",
        "lung-left",
        "lung-right",
        "pancreas",
        "spleen",
    ),
}
#: the MedMNIST file stems of those sets
MEDMNIST_FILES = {"breastmnist": "breast", "retinamnist": "retina", "pneumoniamnist": "chest", "organamnist": "abdomen"}


def class_names(extra: Mapping[str, Any]) -> dict[str, str]:
    """``{id: name}`` from an encoder's ``extra["class_names"]`` (a list or a mapping); empty when it has none.

    >>> class_names({"class_names": {"0": "normal", 1: "nodule"}, "labels": 2})
    {'0': 'normal', '1': 'nodule'}
    >>> class_names({"labels": 20})
    {}
    """
    raw = extra.get("class_names")
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {str(i): str(v) for i, v in enumerate(raw)}
    return {}


def medmnist_organ(dataset: str | None) -> str | None:
    """The medmnist-4 organ a ``medmnist/<organ or file stem>`` dataset names, else None."""
    if not dataset or not dataset.startswith("medmnist/"):
        return None
    name = dataset.split("/", 1)[1].lower()
    return name if name in MEDMNIST_CLASSES else MEDMNIST_FILES.get(name)


class LabelNames:
    """Names for the labels of one table's rows: MedMNIST's by dataset, then the encoder's ``class_names``."""

    def __init__(self, encoder_extra: Mapping[str, Any] | None = None) -> None:
        self.classes = class_names(encoder_extra or {})

    def name(self, label: str | None, dataset: str | None) -> str | None:
        """The label's class name, or None when it has none (a name already, or an id nobody names)."""
        if label is None or not label.strip().lstrip("-").isdigit():
            return None
        key = str(int(label))
        organ = medmnist_organ(dataset)
        if organ is not None:
            names = MEDMNIST_CLASSES[organ]
            if 0 <= int(key) < len(names):
                return f"{organ}: {names[int(key)]}"
        return self.classes.get(key)

    def add_to(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with ``label_name`` set where its label has a name."""
        named = self.name(row.get("label"), row.get("dataset"))
        if named is not None:
            row["label_name"] = named
        return row
