"""registry: versioned files. meta.json's "schema", batch.json's hfbatch.schema, $HFBATCH_HOME/registry.json.

Both directions with real files under tmp_path: a newer hfbatch reads what an older one wrote (files without
a version, as hfbatch wrote them before versions existed; and version 1 read by code whose current version
the test bumps through the MIGRATIONS seam), and an older one refuses what a newer one wrote (schema 99),
with one line that says what to do, and without touching the file."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types import Batch

from hfbatch.__main__ import main
from hfbatch.batches import registry
from hfbatch.batches.control import list_batches, live_batch
from hfbatch.batches.registry import (
    LAYOUT_FILE,
    BatchDir,
    Migration,
    NewerSchema,
    Registry,
    read_json,
    registry_layout,
    registry_schema,
    write_json,
)
from hfbatch.errors import ExitCode, UsageError
from hfbatch.summary import BatchInfo, Stats, batch_object

NEWER = ("batch {id} was written by a newer hfbatch (registry schema 99, this one reads up to 1): "
         "upgrade hfbatch (pip install -U hfbatch)")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("HFBATCH_HOME", str(root))
    return root


def new_batch(status: str = "completed") -> dict[str, Any]:
    info = BatchInfo(input_file_id="in.jsonl")
    info.set_status(status)
    info.state = "finished"
    return batch_object(info, Stats(), 86400)


def new_meta(batch_id: str) -> dict[str, Any]:
    """meta.json as run.py writes it."""
    return {"id": batch_id, "key": f"sha|/o/{batch_id}|/e/{batch_id}", "input_path": "in.jsonl",
            "input_file": "/in.jsonl", "input_sha256": "sha", "output_path": f"/o/{batch_id}",
            "errors_path": f"/e/{batch_id}", "options": {"concurrency": 4}, "created_at": int(time.time()),
            "created_ns": time.time_ns(), "expires_at": int(time.time()) + 86400, "pid": None, "exit_code": 0,
            "total": 0}


def write_unversioned(reg: Registry) -> tuple[BatchDir, dict[str, Any], dict[str, Any]]:
    """A batch as the code before this change wrote it: write_json of the plain dicts, no version anywhere."""
    batch = new_batch()
    b = reg.create(batch["id"])
    meta = new_meta(b.id)
    write_json(b.batch_file, batch)
    write_json(b.meta_file, meta)
    return b, batch, meta


def write_newer(reg: Registry, where: str = "both") -> BatchDir:
    """A batch as a future hfbatch (registry schema 99) wrote it, with fields this one does not know."""
    b = reg.create("batch_" + os.urandom(12).hex())
    batch = {**new_batch(), "id": b.id}
    batch["hfbatch"] = {"schema": 99 if where in ("both", "batch") else 1, "state": "finished", "shiny": [1]}
    write_json(b.batch_file, batch)
    write_json(b.meta_file, {**new_meta(b.id), "schema": 99 if where in ("both", "meta") else 1,
                             "something_new": True})
    return b


def raw(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


# ------------------------------------------------------------------ written by this hfbatch


def test_saved_files_carry_the_schema_and_batch_json_stays_an_openai_batch(home: Path) -> None:
    reg = Registry()
    batch = new_batch()
    b = reg.create(batch["id"])
    meta = new_meta(b.id)
    b.save_batch(batch)
    b.save_meta(meta)
    assert raw(b.meta_file)["schema"] == 1 == registry_schema()
    stored = raw(b.batch_file)
    assert "schema" not in stored, "the top level of batch.json is OpenAI's"
    assert stored["hfbatch"]["schema"] == 1
    Batch.model_validate(stored)
    # stamped in place: the object the CLI prints is the one stored
    assert batch == stored and meta["schema"] == 1
    assert b.batch() == stored and b.meta() == raw(b.meta_file)


def test_the_registry_root_records_its_layout_privately(home: Path) -> None:
    Registry()
    assert raw(home / LAYOUT_FILE) == {"layout": 1} == {"layout": registry_layout()}
    assert stat.S_IMODE((home / LAYOUT_FILE).stat().st_mode) == 0o600


# ------------------------------------------------------------------ a newer hfbatch reads an older registry


def test_files_without_a_version_are_version_1(home: Path) -> None:
    b, batch, meta = write_unversioned(Registry())
    before = (b.batch_file.read_bytes(), b.meta_file.read_bytes())
    assert b.meta() == {**meta, "schema": 1}
    got = b.batch()
    assert got == {**batch, "hfbatch": {**batch["hfbatch"], "schema": 1}}
    Batch.model_validate(got)
    assert (b.batch_file.read_bytes(), b.meta_file.read_bytes()) == before, "reading must not rewrite a file"
    assert [r["id"] for r in list_batches()] == [b.id]


def test_a_registry_made_before_layouts_were_recorded_is_layout_1(home: Path) -> None:
    b, _, _ = write_unversioned(Registry())
    (home / LAYOUT_FILE).unlink()  # as an hfbatch before this change left the root
    reg = Registry()
    assert raw(home / LAYOUT_FILE) == {"layout": 1}
    assert reg.get(b.id) is not None


def _v2_meta(old: dict[str, Any]) -> dict[str, Any]:
    new = {k: v for k, v in old.items() if k != "options"}
    new["run_options"] = old["options"]  # a made-up rename
    return new


def _v2_batch(old: dict[str, Any]) -> dict[str, Any]:
    return {**old, "hfbatch": {**old["hfbatch"], "flavour": "v2"}}


def _v3_meta(old: dict[str, Any]) -> dict[str, Any]:
    assert "run_options" in old, "steps run in order: 1 -> 2 before 2 -> 3"
    return {**old, "v3": True}


@pytest.mark.parametrize("stamped", [False, True], ids=["unversioned", "schema-1"])
def test_a_newer_hfbatch_migrates_version_1_on_read(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                    stamped: bool) -> None:
    reg = Registry()
    b, batch, meta = write_unversioned(reg)
    if stamped:  # as this hfbatch saves it
        b.save_batch(batch)
        b.save_meta(meta)
    before = b.meta_file.read_bytes()
    # the seam: version 2 is one appended Migration
    monkeypatch.setattr(registry, "MIGRATIONS", [Migration(meta=_v2_meta, batch=_v2_batch)])
    assert registry_schema() == 2
    got = b.meta()
    assert got["run_options"] == {"concurrency": 4} and "options" not in got and got["schema"] == 2
    assert b.batch()["hfbatch"]["flavour"] == "v2" and b.batch()["hfbatch"]["schema"] == 2
    assert b.meta_file.read_bytes() == before, "a read migrates in memory only"
    b.save_meta(got)  # the next save writes the new version
    assert raw(b.meta_file)["schema"] == 2 and b.meta() == got
    # and one more appended step: 2 -> 3 runs on the file just saved; 1 -> 2 -> 3 on an older one
    monkeypatch.setattr(registry, "MIGRATIONS", [Migration(meta=_v2_meta, batch=_v2_batch), Migration(meta=_v3_meta)])
    assert b.meta()["v3"] is True and b.meta()["schema"] == 3
    other, _, _ = write_unversioned(reg)
    assert other.meta()["v3"] is True and other.meta()["run_options"] == {"concurrency": 4}
    assert other.batch()["hfbatch"]["flavour"] == "v2", "a step that leaves batch.json alone keeps it as it was"


def test_a_layout_migration_runs_once_under_the_lock(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b, _, _ = write_unversioned(Registry())
    calls: list[Path] = []
    monkeypatch.setattr(registry, "LAYOUT_MIGRATIONS", [calls.append])
    reg = Registry()
    assert calls == [home] and raw(home / LAYOUT_FILE) == {"layout": 2}
    Registry()
    assert calls == [home], "a registry already at the current layout is not migrated again"
    assert reg.get(b.id) is not None


# ------------------------------------------------------------------ an older hfbatch refuses a newer registry


@pytest.mark.parametrize("where", ["meta", "batch", "both"])
def test_a_file_from_a_newer_hfbatch_is_refused_and_left_alone(home: Path, where: str) -> None:
    b = write_newer(Registry(), where)
    before = (b.batch_file.read_bytes(), b.meta_file.read_bytes())
    reader = b.meta if where in ("meta", "both") else b.batch
    with pytest.raises(NewerSchema) as e:
        reader()
    assert isinstance(e.value, UsageError) and e.value.exit_code == ExitCode.USAGE == 2
    assert str(e.value) == NEWER.format(id=b.id)
    assert (e.value.found, e.value.known) == (99, 1)
    assert (b.batch_file.read_bytes(), b.meta_file.read_bytes()) == before


def test_a_damaged_version_is_a_damaged_file(home: Path) -> None:
    b, batch, meta = write_unversioned(Registry())
    for bad in ("2", 0, -1, True, 1.5, [1]):
        write_json(b.meta_file, {**meta, "schema": bad})
        with pytest.raises(ValueError, match="is not a version"):
            b.meta()
    write_json(b.batch_file, {**batch, "hfbatch": {"schema": "x"}})
    with pytest.raises(ValueError, match="is not a version"):
        b.batch()
    write_json(b.meta_file, [1, 2])
    with pytest.raises(ValueError, match="not a JSON object"):
        b.meta()


def test_a_newer_batch_stops_find_rather_than_risk_sending_it_twice(home: Path) -> None:
    reg = Registry()
    mine, _, meta = write_unversioned(reg)
    assert reg.find(meta["key"]) == mine
    newer = write_newer(reg)
    with pytest.raises(NewerSchema, match=newer.id):
        reg.find(meta["key"])


def test_a_registry_laid_out_by_a_newer_hfbatch_is_refused_untouched(home: Path) -> None:
    home.mkdir(mode=0o700)
    write_json(home / LAYOUT_FILE, {"layout": 99})
    with pytest.raises(NewerSchema) as e:
        Registry()
    assert str(e.value) == (f"the registry {home} was written by a newer hfbatch (registry layout 99, this one "
                            "reads up to 1): upgrade hfbatch (pip install -U hfbatch)")
    assert sorted(p.name for p in home.iterdir()) == [LAYOUT_FILE], "nothing created in a newer registry"
    assert read_json(home / LAYOUT_FILE) == {"layout": 99}


def test_a_damaged_registry_json_says_what_to_do(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / LAYOUT_FILE).write_text("{oops")
    with pytest.raises(UsageError, match="registry.json is damaged .*; delete it and hfbatch writes it again"):
        Registry()
    (home / LAYOUT_FILE).unlink()
    Registry()
    assert raw(home / LAYOUT_FILE) == {"layout": 1}


def test_list_collects_newer_batches_when_asked_and_refuses_otherwise(home: Path) -> None:
    reg = Registry()
    mine, _, _ = write_unversioned(reg)
    newer = write_newer(reg)
    with pytest.raises(NewerSchema, match=newer.id):
        list(list_batches())
    seen: list[NewerSchema] = []
    assert [r["id"] for r in list_batches(newer=seen)] == [mine.id]
    assert [str(e) for e in seen] == [NEWER.format(id=newer.id)]
    assert live_batch(mine)["id"] == mine.id


@pytest.mark.parametrize("command", ["list", "status", "wait", "results"])
def test_the_cli_shows_one_line_for_a_newer_batch(home: Path, command: str,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    b = write_newer(Registry())
    before = (b.batch_file.read_bytes(), b.meta_file.read_bytes())
    code = main([command] if command == "list" else [command, b.id])
    out, err = capfd.readouterr()
    if command == "list":  # the readable batches are listed (none here), the newer one named on stderr
        assert code == 0 and out == ""
        assert err == f"hfbatch: note: 1 batch(es) not listed: {NEWER.format(id=b.id)}\n"
    else:
        assert code == 2
        assert out == "" and err == f"hfbatch: {NEWER.format(id=b.id)}\n"
    assert (b.batch_file.read_bytes(), b.meta_file.read_bytes()) == before
