"""Scoped API keys without a server: token format and hashing, the key file (atomic, 0600,
reloaded on change), and the authentication decisions (revoked, expired, network, legacy, open
installs)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import msgspec
import pytest
from medserve.server.auth.authenticator import Authenticator, Refusal, legacy_key_id
from medserve.server.auth.keys import new_key, rotated, secret_matches, split_token
from medserve.server.auth.principal import Limits, Principal
from medserve.server.auth.scopes import SCOPES, parse_scopes, route_scope
from medserve.server.auth.store import LiveKeys, editing, read_keys, write_keys
from medserve.server.settings import SettingsError, load_settings

LIMITS = Limits(rpm=60, tpm=1000, max_streams=2)


def _bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def _add(path: Path, **kwargs: object) -> str:
    with editing(path) as records:
        issued = new_key(
            str(kwargs.pop("name", "emr")),
            tuple(kwargs.pop("scopes", ("chat",))),  # type: ignore[arg-type]
            existing_ids=set(records),
            **kwargs,  # type: ignore[arg-type]
        )
        records[issued.record.id] = issued.record
    return issued.token


def test_only_a_salted_hash_is_stored_and_it_verifies_the_token() -> None:
    issued = new_key("emr", ("chat",))
    key_id, secret = split_token(issued.token) or ("", "")
    assert key_id == issued.record.id and issued.token.startswith(issued.record.prefix)
    assert secret not in msgspec.json.encode(issued.record).decode()
    assert secret_matches(issued.record, secret)
    assert not secret_matches(issued.record, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    # the same secret under another salt hashes differently
    other = new_key("emr", ("chat",))
    assert other.record.hash != issued.record.hash and other.record.salt != issued.record.salt


def test_rotation_keeps_the_id_and_invalidates_the_old_secret() -> None:
    issued = new_key("emr", ("chat", "cases:read"), rpm=5)
    again = rotated(issued.record)
    old_secret = (split_token(issued.token) or ("", ""))[1]
    new_secret = (split_token(again.token) or ("", ""))[1]
    assert again.record.id == issued.record.id and again.record.scopes == ["chat", "cases:read"]
    assert again.record.rpm == 5 and again.record.prefix != issued.record.prefix
    assert secret_matches(again.record, new_secret)
    assert not secret_matches(again.record, old_secret)


@pytest.mark.parametrize("token", ["", "msk_", "msk__x", "sk_abc_def", "msk_abc", "garbage"])
def test_malformed_tokens_do_not_split(token: str) -> None:
    assert split_token(token) is None


def test_scope_names_are_checked() -> None:
    assert parse_scopes("chat, cases:read,chat") == ("chat", "cases:read")
    for bad in ("chat,cases:delete", "", "Chat"):
        with pytest.raises(ValueError, match="scope"):
            parse_scopes(bad)
    with pytest.raises(ValueError, match="unknown scope"):
        route_scope("cases:all")


def test_key_file_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keys.json"
    _add(path, name="a")
    _add(path, name="b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(r.name for r in read_keys(path).values()) == ["a", "b"]
    # no temporary file is left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_live_view_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    live = LiveKeys(path)
    assert live.refresh() == {}
    _add(path, name="first")
    assert [r.name for r in live.refresh().values()] == ["first"]
    _add(path, name="second")
    assert sorted(r.name for r in live.refresh().values()) == ["first", "second"]
    path.write_text("{not json")
    assert live.refresh() == {} and live.damaged


def test_authentication_decisions(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    chat = _add(path, scopes=("chat",), rpm=7)
    lan_only = _add(path, scopes=("chat",), networks=("10.0.0.0/8",))
    expiring = _add(path, scopes=("chat",), expires_at=time.time() + 3600)
    auth = Authenticator(path, (), LIMITS)
    assert auth.enforcing

    principal = auth.authenticate(_bearer(chat), "127.0.0.1")
    assert isinstance(principal, Principal) and principal.scopes == {"chat"}
    assert principal.limits == Limits(rpm=7, tpm=1000, max_streams=2)  # unset: the defaults

    for header in (
        b"",
        b"Bearer",
        _bearer("msk_nope_nope"),
        _bearer(chat + "x"),
        b"Basic " + chat.encode(),
    ):
        refusal = auth.authenticate(header, "127.0.0.1")
        assert isinstance(refusal, Refusal) and refusal.status == 401, header

    assert isinstance(auth.authenticate(_bearer(lan_only), "10.1.2.3"), Principal)
    assert isinstance(auth.authenticate(_bearer(lan_only), "::ffff:10.1.2.3"), Principal)
    refusal = auth.authenticate(_bearer(lan_only), "192.168.1.1")
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.code) == (
        403,
        "network_not_allowed",
    )

    assert isinstance(auth.authenticate(_bearer(expiring), "127.0.0.1"), Principal)
    with editing(path) as records:
        key_id = (split_token(expiring) or ("", ""))[0]
        records[key_id] = msgspec.structs.replace(records[key_id], expires_at=time.time() - 1)
        revoke_id = (split_token(chat) or ("", ""))[0]
        records[revoke_id] = msgspec.structs.replace(records[revoke_id], revoked_at=time.time())
    refusal = auth.authenticate(_bearer(expiring), "127.0.0.1")
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.code) == (403, "key_expired")
    refusal = auth.authenticate(_bearer(chat), "127.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.status == 401


def test_legacy_config_keys_hold_every_scope(tmp_path: Path) -> None:
    legacy = "legacy-key-0123456789"
    auth = Authenticator(tmp_path / "absent.json", (legacy,), LIMITS)
    assert auth.enforcing
    principal = auth.authenticate(_bearer(legacy), "127.0.0.1")
    assert isinstance(principal, Principal)
    assert principal.scopes == set(SCOPES) and principal.key_id == legacy_key_id(legacy)
    assert legacy not in principal.key_id
    assert isinstance(auth.authenticate(_bearer("legacy-key-0123456780"), "127.0.0.1"), Refusal)


def test_open_install_becomes_closed_for_good_once_a_key_appears(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    auth = Authenticator(path, (), LIMITS)
    assert not auth.enforcing
    anonymous = auth.authenticate(b"", "127.0.0.1")
    assert isinstance(anonymous, Principal) and anonymous.scopes == set(SCOPES)

    token = _add(path)
    assert isinstance(auth.authenticate(b"", "127.0.0.1"), Refusal)
    assert isinstance(auth.authenticate(_bearer(token), "127.0.0.1"), Principal)
    # deleting the key file afterwards locks everyone out instead of opening the server
    os.unlink(path)
    assert isinstance(auth.authenticate(b"", "127.0.0.1"), Refusal)
    assert isinstance(auth.authenticate(_bearer(token), "127.0.0.1"), Refusal)


def test_a_damaged_key_file_at_start_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("[]")
    auth = Authenticator(path, (), LIMITS)
    assert auth.enforcing
    assert isinstance(auth.authenticate(b"", "127.0.0.1"), Refusal)
    # repaired (an empty store): still closed, as keys were there when it started
    write_keys(path, {})
    assert isinstance(auth.authenticate(b"", "127.0.0.1"), Refusal)


def test_auth_and_audit_settings_come_from_toml_and_env_and_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "medserve.toml"
    config.write_text(
        '[auth]\nkeys_file = "/srv/keys.json"\ndefault_rpm = 30\n[audit]\nfsync = false\n'
    )
    settings = load_settings(config, env={"MEDSERVE_AUTH_DEFAULT_RPM": "90"})
    assert settings.auth.keys_file == Path("/srv/keys.json") and settings.auth.default_rpm == 90
    assert settings.audit.fsync is False and settings.audit.enabled
    for env, named in (
        ({"MEDSERVE_AUTH_DEFAULT_TPM": "-1"}, "auth.default_tpm"),
        ({"MEDSERVE_AUDIT_MAX_FILE_BYTES": "100"}, "audit.max_file_bytes"),
        ({"MEDSERVE_AUDIT_FSYNC": "sometimes"}, "audit.fsync"),
    ):
        with pytest.raises(SettingsError, match=named.split(".")[1]):
            load_settings(None, env=env)
