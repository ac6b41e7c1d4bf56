"""registry.home(): where the registry lives, and that hfbatch never loosens or tightens a folder it did not make.

Real folders under tmp_path, the environment variable set per test (monkeypatch.setenv is the seam the
function reads: $HFBATCH_HOME)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hfbatch.errors import UsageError
from hfbatch.storage import home


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_missing_home_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "a" / "b"))
    assert home() == tmp_path / "a" / "b"
    assert mode(tmp_path / "a" / "b") == 0o700


def test_a_shared_folder_keeps_its_mode_and_gets_a_private_subfolder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    monkeypatch.setenv("HFBATCH_HOME", str(shared))
    root = home()
    assert mode(shared) == 0o1777, "a shared folder must not be chmod'ed: it would lock other users out"
    assert root == shared / f"hfbatch-{os.getuid()}" and mode(root) == 0o700


def test_a_shared_folder_through_a_symlink_is_not_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    link = tmp_path / "link"
    link.symlink_to(shared)
    monkeypatch.setenv("HFBATCH_HOME", str(link))
    root = home()
    assert mode(shared) == 0o1777
    assert root.resolve().parent == shared.resolve() and mode(root) == 0o700


def test_an_existing_folder_of_ours_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    monkeypatch.setenv("HFBATCH_HOME", str(mine))
    assert home() == mine
    assert mode(mine) == 0o755  # not ours to change; what hfbatch writes inside is 0700/0600


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder owned by another user needs root")
def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("HFBATCH_HOME", str(theirs))
    with pytest.raises(UsageError, match="owned by another user"):
        home()


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder owned by another user needs root")
def test_a_planted_subfolder_in_a_shared_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    planted = shared / f"hfbatch-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    monkeypatch.setenv("HFBATCH_HOME", str(shared))
    with pytest.raises(UsageError, match="owned by another user"):
        home()
