"""The service on loopback, registered as a SMART app at the test EHR (tests/smart/ehr.py):
what the launch tests and the browser test share.

``smart_site`` binds the service's port first (the EHR registers the redirect URI), starts the
EHR (SEKMET holding the synthetic chart, its gate, the oidc-provider authorization server),
then configures the service with ``[smart.ehrs.test-ehr]`` pointing at the EHR's FHIR base.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from fhir_kat.app import create_app
from fhir_kat.settings import Settings, load_settings
from tests.conftest import CLINIC_ORG, TEST_CLIENTS, token_for
from tests.exchange.conftest import SekmetServer
from tests.smart.ehr import APP_CLIENT, APP_SECRET, KEY_CLIENT, TestEhr

SECRET_ENV = "KAT_TEST_SMART_SECRET"


class ShiftedClock:
    """The wall clock (the EHR's tokens are stamped with it), movable forward by a test."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class SmartSite:
    app: Flask
    url: str
    ehr: TestEhr
    clock: ShiftedClock

    def state(self) -> Any:
        return self.app.extensions["fhir_kat"]

    def api(self, method: str, path: str, who: str = "staff", **kw: Any) -> Any:
        client = self.app.test_client()
        headers = {"Authorization": f"Bearer {token_for(self.app, who)}"}
        return client.open(path, method=method, headers=headers, **kw)

    def audit(self) -> list[dict[str, Any]]:
        bundle = self.api("GET", "/fhir/AuditEvent?_count=500", "admin").get_json()
        return [e["resource"] for e in bundle.get("entry", [])]


def ehr_registration(ehr: TestEhr, **overrides: Any) -> dict[str, Any]:
    return {
        "title": "Test EHR",
        "iss": ehr.fhir_base,
        "client_id": APP_CLIENT,
        "client_secret_env": SECRET_ENV,
        "organization": CLINIC_ORG,
        "referrer_scopes": ["system/*.cruds"],
        **overrides,
    }


@contextlib.contextmanager
def smart_site(
    tmp_path: Path,
    sekmet_bin: Path,
    monkeypatch: Any,
    *,
    key_file: Path | None = None,
    jwks: dict[str, Any] | None = None,
    database_url: str | None = None,
) -> Iterator[SmartSite]:
    server: BaseWSGIServer = make_server("127.0.0.1", 0, _unavailable, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    sekmet = SekmetServer(sekmet_bin, tmp_path / "sekmet")
    sekmet.start()
    monkeypatch.setenv(SECRET_ENV, APP_SECRET)
    try:
        with TestEhr(sekmet, [f"{url}/smart/callback"], jwks=jwks) as ehr:
            ehr.app_launch_url = f"{url}/smart/launch"
            ehr.seed()
            ehrs = {"test-ehr": ehr_registration(ehr)}
            if key_file is not None:
                keyed = ehr_registration(ehr, client_id=KEY_CLIENT, private_key_file=str(key_file))
                del keyed["client_secret_env"]
                keyed["key_id"] = "kat-rs384"
                # The same EHR under a second registration would repeat its iss: refused at
                # start-up. The key-authenticated client is registered alone instead.
                ehrs = {"test-ehr": keyed}
            base = load_settings(
                {},
                database_url=database_url or f"sqlite:///{tmp_path / 'smart.sqlite3'}",
                data_dir=str(tmp_path / "v"),
                pipeline_strict=True,
            )
            settings: Settings = replace(
                base, extra={"clients": TEST_CLIENTS, "smart": {"ehrs": ehrs}}
            )
            clock = ShiftedClock()
            app = create_app(settings, clock=clock)
            server.app = app  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                yield SmartSite(app, url, ehr, clock)
            finally:
                server.shutdown()
                thread.join(timeout=10)
                app.extensions["fhir_kat"].export.shutdown()
                app.extensions["fhir_kat"].store.dispose()
    finally:
        sekmet.stop()


def _unavailable(_environ: Any, start_response: Callable[..., Any]) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]
