"""Serve ownership: the owner id of a token (salted HMAC), the salt file, and who sees what."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hfbatch.errors import UsageError
from hfbatch.serve.owners import API_KEY_OWNER, SALT_BYTES, Caller, Owners


def test_owner_ids_are_salted_stable_and_private(tmp_path: Path) -> None:
    salt = tmp_path / "owner.salt"
    a = Owners(salt)
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600 and len(salt.read_bytes()) == SALT_BYTES
    assert not list(tmp_path.glob(".*.tmp"))
    one, two = a.of("hf_token_one"), a.of("hf_token_two")
    assert one != two and len(one) == 64 and "hf_token_one" not in one
    assert Owners(salt).of("hf_token_one") == one  # the salt is kept: ids survive a restart
    other = tmp_path / "other.salt"
    assert Owners(other).of("hf_token_one") != one  # another store, another salt


def test_a_damaged_salt_is_a_usage_error(tmp_path: Path) -> None:
    salt = tmp_path / "owner.salt"
    salt.write_bytes(b"short")
    with pytest.raises(UsageError, match="damaged"):
        Owners(salt)


def test_who_sees_what(tmp_path: Path) -> None:
    owners = Owners(tmp_path / "owner.salt")
    a, b = Caller(owners.of("a")), Caller(owners.of("b"))
    key = Caller(API_KEY_OWNER, sees_all=True)
    assert a.owns(a.owner) and not a.owns(b.owner) and not b.owns(a.owner)
    for caller in (a, b):
        assert not caller.owns(None) and not caller.owns(API_KEY_OWNER) and not caller.owns(42)
    assert all(key.owns(x) for x in (a.owner, b.owner, None, API_KEY_OWNER))
    assert not Caller(owners.of(API_KEY_OWNER)).owns(API_KEY_OWNER)  # a token spelled like the marker
