"""Package layout: the core lives in helix_p2p/, the three shells in top-level folders that install
as helix_p2p.node, helix_p2p.client and helix_p2p.bootstrap (DESIGN.md, "Layout"). TOML alone cannot
combine package discovery with a package-dir mapping, so the list is computed here."""

from setuptools import find_namespace_packages, find_packages, setup

SHELLS = ("node", "client", "bootstrap")

packages = find_packages(include=["helix_p2p", "helix_p2p.*"])
# The bundled Helix data (clusters, GPU profiles, traces) ships as package data.
packages += [p for p in find_namespace_packages(include=["helix_p2p.data.*"]) if p not in packages]
package_dir = {"helix_p2p": "helix_p2p"}
for shell in SHELLS:
    packages.append(f"helix_p2p.{shell}")
    packages += [f"helix_p2p.{shell}.{sub}" for sub in find_packages(shell)]
    package_dir[f"helix_p2p.{shell}"] = shell

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"": ["*.json", "*.csv", "*.md", "*.txt"]},
)
