"""Settings: environment over TOML over defaults, and one clear message for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_kat.cli import main
from fhir_kat.settings import SettingsError, load_settings


def test_defaults_are_the_embedded_sqlite() -> None:
    s = load_settings({})
    assert s.host == "127.0.0.1" and s.port == 8080
    assert s.uses_sqlite and s.effective_database_url.endswith("var/fhir_kat.sqlite3")


def test_environment_overrides_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "kat.toml"
    cfg.write_text('[service]\nport = 9000\nlog_level = "debug"\n[clients.demo]\nrole = "admin"\n')
    s = load_settings({"FHIR_KAT_CONFIG": str(cfg), "FHIR_KAT_PORT": "9100"})
    assert s.port == 9100 and s.log_level == "DEBUG"
    assert s.extra["clients"]["demo"]["role"] == "admin"


def test_every_bad_value_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "kat.toml"
    cfg.write_text("[service]\nprot = 1\n[nonsense]\n")
    env = {
        "FHIR_KAT_CONFIG": str(cfg),
        "FHIR_KAT_PORT": "eighty",
        "FHIR_KAT_MAX_BODY_BYTES": "-1",
        "FHIR_KAT_DATABASE_URL": "mysql://x",
        "FHIR_KAT_LOG_LEVEL": "chatty",
    }
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    text = str(err.value)
    for fragment in ("prot", "[nonsense]", "port", "max_body_bytes", "database_url", "log_level"):
        assert fragment in text


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[service\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({"FHIR_KAT_CONFIG": str(cfg)})
    with pytest.raises(SettingsError, match="not found"):
        load_settings({"FHIR_KAT_CONFIG": str(tmp_path / "nope.toml")})


def test_cli_exits_2_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIR_KAT_PORT", "99999")
    assert main(["serve"]) == 2
    assert "port" in capsys.readouterr().err


def test_hash_secret_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from fhir_kat.security.secrets import verify_secret

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-value\n"))
    assert main(["hash-secret"]) == 0
    stored = capsys.readouterr().out.strip()
    assert stored.startswith("pbkdf2_sha256$") and verify_secret("s3cret-value", stored)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["hash-secret"]) == 2
