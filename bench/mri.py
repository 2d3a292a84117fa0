"""CPU-seconds per volume of the full brain-MRI recipe on the real volumes in ../shared/data/mri.

.venv/bin/python bench/mri.py
"""

from __future__ import annotations

import time

from medret.config import data_root
from medret.io.volume import read_nifti
from medret.preprocess.mri.recipe import load_template, preprocess_brain

VOLUMES = [
    "brainles__TCGA-FG-6692_t1.nii.gz",
    "brainles__TCGA-FG-6692_t1c.nii.gz",
    "brainles__TCGA-FG-6692_t2.nii.gz",
    "brainles__TCGA-FG-6692_fla.nii.gz",
    "mricron__chris_t1.nii.gz",
    "mricron__ch2.nii.gz",
]


def main() -> None:
    template = load_template("robex")
    total = 0.0
    print("| volume | CPU s | wall s | register | skull strip | N4 | slices |")
    print("|---|---|---|---|---|---|---|")
    for name in VOLUMES:
        vol = read_nifti(data_root() / "mri" / name)
        c0, w0 = time.process_time(), time.perf_counter()
        r = preprocess_brain(vol, template)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        total += cpu
        t = r.timings
        print(
            f"| {name} | {cpu:.1f} | {wall:.1f} | {t['register']:.1f} | {t['skull_strip']:.2f} | {t['n4']:.1f} | "
            f"{t['slices']:.2f} |"
        )
    print(f"\nmean CPU-seconds per volume: {total / len(VOLUMES):.1f}")


if __name__ == "__main__":
    main()
