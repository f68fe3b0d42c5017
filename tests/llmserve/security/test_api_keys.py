"""The API-key file: digests, names, model allow-lists, limits, revocation and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.security.api_keys import (
    ApiKeyFile,
    AuthFailure,
    bearer_token,
    hash_key,
    new_key,
    parse_key_file,
)
from llmserve.security.rate_limit import RateLimits

ALICE, BOB, MALLORY = new_key(), new_key(), new_key()


def key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return path


def test_parse_names_options_and_defaults() -> None:
    text = (f"# the fleet's keys\n{hash_key(ALICE)}  alice  models=m1,m2 rps=5 tps=2000\n\n"
            f"sha256:{hash_key(BOB).upper()}  # no name, default limits\n"
            f"{hash_key(MALLORY)} mallory revoked tps=unlimited\n")
    alice, bob, mallory = parse_key_file(text, RateLimits(requests_per_s=1.0, tokens_per_s=10.0))
    assert alice.key_id == "alice" and alice.models == {"m1", "m2"}
    assert alice.limits == RateLimits(5.0, 2000.0) and alice.allows("m1") and not alice.allows("m3")
    assert bob.key_id == f"key-{hash_key(BOB)[:8]}" and bob.models is None and bob.allows("anything")
    assert bob.limits == RateLimits(1.0, 10.0)
    assert mallory.revoked and mallory.limits == RateLimits(1.0, None)
    assert not (alice.admin or bob.admin or mallory.admin)


def test_admin_keys_with_or_without_a_name() -> None:
    named, unnamed = parse_key_file(f"{hash_key(ALICE)} ops admin models=m1\n{hash_key(BOB)} admin\n",
                                    RateLimits())
    assert named.key_id == "ops" and named.admin and named.models == {"m1"}
    assert unnamed.key_id == f"key-{hash_key(BOB)[:8]}" and unnamed.admin  # "admin" is no name


@pytest.mark.parametrize("text", [
    "not-a-digest alice\n",
    f"{hash_key(ALICE)} alice colour=blue\n",
    f"{hash_key(ALICE)} alice rps=-1\n",
    f"{hash_key(ALICE)} alice\n{hash_key(ALICE)} bob\n",
    f"{hash_key(ALICE)} alice\n{hash_key(BOB)} alice\n",
])
def test_bad_files_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_key_file(text, RateLimits())


def test_authenticate_missing_unknown_revoked(tmp_path: Path) -> None:
    keys = ApiKeyFile(key_file(tmp_path, f"{hash_key(ALICE)} alice\n{hash_key(MALLORY)} mallory revoked\n"))
    assert keys.authenticate(ALICE).key_id == "alice"
    for presented, why in ((None, "missing"), ("", "missing"), (BOB, "unknown"), (ALICE + "x", "unknown"),
                           ("x" * 10_000, "unknown"), (MALLORY, "revoked")):
        with pytest.raises(AuthFailure) as err:
            keys.authenticate(presented)
        assert err.value.reason == why


def test_edits_take_effect_without_restart_and_a_bad_edit_keeps_the_last_good_file(tmp_path: Path) -> None:
    path = key_file(tmp_path, f"{hash_key(ALICE)} alice\n")
    keys = ApiKeyFile(path, min_interval_s=0)
    assert keys.authenticate(ALICE).key_id == "alice"
    path.write_text(f"{hash_key(ALICE)} alice revoked\n{hash_key(BOB)} bob\n")
    with pytest.raises(AuthFailure):
        keys.authenticate(ALICE)
    assert keys.authenticate(BOB).key_id == "bob"
    path.write_text("garbage\n")
    assert keys.authenticate(BOB).key_id == "bob", "a broken file keeps the previous keys"


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
