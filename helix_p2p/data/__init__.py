"""Bundled facts: the Helix paper's clusters, GPU profiles and traces (see helix/README.md for their
source, license and units). Resolved relative to the installed package, never to ../shared."""

from __future__ import annotations

from pathlib import Path

HELIX_DATA_DIR = Path(__file__).resolve().parent / "helix"
CLUSTERS_DIR = HELIX_DATA_DIR / "clusters"
PROFILES_DIR = HELIX_DATA_DIR / "profiles"
TRACES_DIR = HELIX_DATA_DIR / "traces"


def bundled_cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.json"))


def resolve_cluster_path(name_or_path: str) -> Path:
    """A path as given, or the bundled cluster of that name (`single24-llama70b`)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json" or "/" in name_or_path:
        return path
    bundled = CLUSTERS_DIR / f"{name_or_path}.json"
    return bundled if bundled.exists() else path
