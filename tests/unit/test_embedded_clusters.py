"""As root, the embedded PostgreSQL's data lives in a cluster folder of its own under
PG_RUN_DIR, linked from FLEET_HOME: a cluster whose FLEET_HOME was deleted is removed at the
next start, one still linked is kept, and one nobody can tell the owner of is left alone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services import embedded


def cluster(run_dir: Path, name: str, origin: Path | None, age_s: float = 3600) -> Path:
    folder = run_dir / f"cluster-{name}"
    (folder / "data").mkdir(parents=True)
    if origin is not None:
        (folder / "origin").write_text(str(origin))
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_only_the_clusters_whose_home_is_gone_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr(embedded, "PG_RUN_DIR", run_dir)
    home = tmp_path / "home"
    home.mkdir()
    linked_from = home / "postgres"
    linked = cluster(run_dir, "linked", linked_from)
    linked_from.symlink_to(linked / "data", target_is_directory=True)
    orphan = cluster(run_dir, "orphan", tmp_path / "deleted-home" / "postgres")
    unknown = cluster(run_dir, "unknown", None)  # an older version's, or a failed start's
    young = cluster(run_dir, "young", tmp_path / "elsewhere" / "postgres", age_s=0)

    embedded._remove_orphan_clusters()

    assert linked.exists() and unknown.exists() and young.exists()
    assert not orphan.exists()
