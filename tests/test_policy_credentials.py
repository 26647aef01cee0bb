"""Provider keys come from env vars or files, and never show up in errors."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from policy_fixtures import VALID_POLICY, load_valid

from control_plane.policy.credentials import CredentialError, resolve_credentials

SECRET = "sk-test-0123456789"

WITH_FILE_KEY = VALID_POLICY.replace(
    "    gpus:\n      - {type: L4, memory_gb: 24}\n    models:\n      - {name: small",
    "    credentials: {file: keys/beta.key, header: x-api-key, prefix: ''}\n"
    "    gpus:\n      - {type: L4, memory_gb: 24}\n    models:\n      - {name: small",
)


def test_env_and_relative_file_are_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "beta.key").write_text(f"  {SECRET}-beta\n")
    config = load_valid(tmp_path, WITH_FILE_KEY)
    assert resolve_credentials(config, {"ALPHA_KEY": f"{SECRET}\n"}) == {
        "alpha": SECRET, "beta": f"{SECRET}-beta"}


def test_os_environ_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPHA_KEY", SECRET)
    assert resolve_credentials(load_valid(tmp_path)) == {"alpha": SECRET}


def test_providers_without_credentials_are_skipped(tmp_path: Path) -> None:
    text = VALID_POLICY.replace("    credentials:\n      env: ALPHA_KEY\n", "")
    assert resolve_credentials(load_valid(tmp_path, text), {}) == {}


def test_every_problem_names_provider_and_origin(tmp_path: Path) -> None:
    config = load_valid(tmp_path, WITH_FILE_KEY)
    with pytest.raises(CredentialError) as caught:
        resolve_credentials(config, {})
    problems = {(p.provider, p.origin, p.reason) for p in caught.value.problems}
    key_file = tmp_path / "keys" / "beta.key"
    assert problems == {
        ("alpha", "env ALPHA_KEY", "environment variable not set"),
        ("beta", f"file {key_file}", "cannot read: No such file or directory"),
    }
    assert str(caught.value).splitlines() == [
        "provider 'alpha': credential from env ALPHA_KEY: environment variable not set",
        (f"provider 'beta': credential from file {key_file}: cannot read: "
         "No such file or directory"),
    ]


@pytest.mark.parametrize(("value", "reason"), [
    ("   \n", "empty"),
    (f"{SECRET}\nX-Injected: 1", "contains control characters or several lines"),
    (f"{SECRET}\x00", "contains control characters or several lines"),
])
def test_unusable_values_are_rejected_without_quoting_them(
    tmp_path: Path, value: str, reason: str
) -> None:
    with pytest.raises(CredentialError) as caught:
        resolve_credentials(load_valid(tmp_path), {"ALPHA_KEY": value})
    (problem,) = caught.value.problems
    assert (problem.provider, problem.reason) == ("alpha", reason)
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value.problems)


def test_undecodable_key_file_does_not_leak_bytes(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "beta.key").write_bytes(b"\xffsecret-bytes")
    config = load_valid(tmp_path, WITH_FILE_KEY)
    with pytest.raises(CredentialError) as caught:
        resolve_credentials(config, {"ALPHA_KEY": SECRET})
    (problem,) = caught.value.problems
    assert (problem.provider, problem.reason) == ("beta", "file is not UTF-8 text")
    printed = "".join(traceback.format_exception(caught.value))
    assert "secret-bytes" not in printed and "0xff" not in printed


def test_absolute_file_path_is_used_as_is(tmp_path: Path) -> None:
    key = tmp_path / "elsewhere.key"
    key.write_text(SECRET)
    text = WITH_FILE_KEY.replace("file: keys/beta.key", f"file: {key}")
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    config = load_valid(policy_dir, text)
    assert resolve_credentials(config, {"ALPHA_KEY": "a"})["beta"] == SECRET
