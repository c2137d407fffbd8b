"""The tests' OpenID Provider: ``provider.mjs`` (panva's oidc-provider, pinned in
tools/hl7_packages.py) run with Node.js on loopback, with synthetic users whose groups map to
the service's roles.

``IdentityProvider`` starts it (a free port on 127.0.0.1, a bounded lifetime, ended when the
test ends or its standard input closes), registers the service's web pages as clients with the
redirect URIs given, and lets a test change a user "at the IdP" (``set_groups``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tools.hl7_packages import ensure_tree

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 30

#: Synthetic people and their groups at the IdP (the service maps the groups to roles).
USERS: dict[str, dict[str, Any]] = {
    "dana": {
        "sub": "u-1001",
        "password": "dana-password",
        "name": "Dana Rivera",
        "email": "dana@clinic7.example.org",
        "groups": ["kat-nurses"],
    },
    "sam": {
        "sub": "u-1002",
        "password": "sam-password",
        "name": "Dr Sam Okafor",
        "email": "sam@clinic7.example.org",
        "groups": ["clinic7-referrers"],
    },
    "alex": {
        "sub": "u-1003",
        "password": "alex-password",
        "name": "Alex Chen",
        "email": "alex@ha.example.org",
        "groups": ["unrelated-group"],
    },
}


def node() -> str:
    path = shutil.which("node")
    if path is None:
        raise RuntimeError("node is not on PATH: the tests' OpenID Provider needs Node.js 20+")
    return path


class IdentityProvider:
    def __init__(self, clients: list[dict[str, Any]], ttl_seconds: int = 900) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kat-idp-"))
        self.users_file = self.folder / "users.json"
        self.users: dict[str, dict[str, Any]] = json.loads(json.dumps(USERS))
        self._write_users()
        config = {
            "modules": str(ensure_tree("oidc-provider")),
            "clients": clients,
            "users_file": str(self.users_file),
            "ttl_seconds": ttl_seconds,
        }
        (self.folder / "config.json").write_text(json.dumps(config))
        self.log = self.folder / "provider.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [node(), str(HERE / "provider.mjs"), str(self.folder / "config.json")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the provider prints its issuer once listening
        if not line:
            self.stop()
            raise RuntimeError(f"the OpenID Provider did not start: {self._stderr()}")
        self.issuer: str = json.loads(line)["issuer"]

    def _write_users(self) -> None:
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.users))
        tmp.replace(self.users_file)  # the provider never reads half a file

    def set_groups(self, username: str, groups: list[str]) -> None:
        """An administrator changes a person's groups at the IdP."""
        self.users[username]["groups"] = groups
        self._write_users()

    def _stderr(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()  # the provider exits when its input closes
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> IdentityProvider:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
