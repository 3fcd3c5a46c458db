"""What a re-run of a stage gives back: the same files bit for bit, or not; recorded in each stage and the manifest.

Checked, not assumed: `tests/reliability` runs recipes twice and killed-and-resumed, and compares these digests.
"""

from __future__ import annotations

import hashlib

BIT_EXACT = "bit-exact"  # same recipe, seed, library versions, machine and thread count: the same files


def reproducibility(device: str, processes: int) -> str:
    """BIT_EXACT where the suite has checked it (one process on a CPU), else why not."""
    if device != "cpu":
        return ("not bit-exact: GPU kernels add in no fixed order, so a re-run differs in the last bits; each "
                "run's own verification bounds its metric")
    if processes > 1:
        return (f"not checked bit-exact: {processes} processes average their gradients; a re-run with as many "
                "processes is expected to match, unverified")
    return BIT_EXACT


def files_digest(files: dict[str, str]) -> str:
    """One sha256 over a stage's files (name -> sha256): equal digests, equal stages."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()
