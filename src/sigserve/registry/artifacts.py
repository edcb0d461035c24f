"""Content-addressed artifacts: ``artifacts/<sha[:2]>/<sha><ext>`` under SIGSERVE_HOME.

A file is named by the sha256 of its bytes, and the sha is verified on every load: a file that
does not match is refused with ``artifact_corrupt`` before any library deserialises it.

Usage::

    source = LocalArtifactSource(settings.home)
    sha, rel = source.put(Path("model.txt"), ext=".txt")
    path = source.verified_path(sha, rel)        # raises ArtifactCorrupt / ModelArtifactMissing
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from ..errors import ArtifactCorrupt, ModelArtifactMissing

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactSource(Protocol):
    root: Path

    def put(self, path: Path, ext: str) -> tuple[str, str]:
        """Store a copy of ``path``; return (sha256, path relative to the home)."""
        ...

    def verified_path(self, sha256: str | None, relative: str | None) -> Path:
        """The absolute path of an artifact whose bytes hash to ``sha256``."""
        ...


class LocalArtifactSource:
    """Artifacts in a local directory tree, written atomically (temp file + rename)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "artifacts"

    def put(self, path: Path, ext: str) -> tuple[str, str]:
        sha = sha256_file(path)
        relative = f"artifacts/{sha[:2]}/{sha}{ext}"
        target = self.home / relative
        if target.exists() and sha256_file(target) == sha:
            return sha, relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            if sha256_file(Path(tmp)) != sha:
                raise ArtifactCorrupt(f"{path} changed while it was being copied",
                                      details={"path": str(path)})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return sha, relative

    def verified_path(self, sha256: str | None, relative: str | None) -> Path:
        if not sha256 or not relative:
            raise ModelArtifactMissing("the model version has no artifact sha256",
                                       details={"sha256": sha256})
        path = self.home / relative
        if not path.is_file():
            raise ModelArtifactMissing(f"the artifact file {relative} is absent",
                                       details={"sha256": sha256, "path": relative})
        actual = sha256_file(path)
        if actual != sha256:
            raise ArtifactCorrupt(
                f"artifact {relative} does not match its sha256: refused, never loaded",
                details={"expected": sha256, "actual": actual, "path": relative})
        return path
