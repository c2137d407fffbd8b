"""Every shell example in README.md and docs/, and every ``Example:`` of ``fhir-kat <command>
--help``, runs as written against a live service started the way the README says
(``./run.sh serve``), so an example cannot rot.

The examples run in a scratch folder laid out like a checkout (``run.sh``, ``server.py``,
``docs``, ``.venv``), document by document in one shell, so the README's ``SECRET``/``TOKEN``
carry on as a reader's would. Every ``curl`` fails the example on an HTTP error. The only edits:
the service's port, and ``<task id>`` (the referral the examples just sent). An example that
cannot run here says so in the document itself, on the line before its fence
(``<!-- example: not run — why -->``); one without that line runs."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fhir_kat.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(sh|bash|shell|console)\s*$")
NOT_RUN = re.compile(r"^<!-- example: not run — (.+) -->$")
#: ``fhir-kat <command> --help`` examples that cannot run in a test, and why.
HELP_NOT_RUN = {
    "serve": "it is the service: started by the fixture, as ./run.sh serve",
    "worker": "runs until stopped, against a deployment's partner configuration",
    "mllp": "runs until stopped, against a deployment's [v2_senders.*] (tests/test_v2_mllp.py "
    "starts it and sends to it)",
    "sandbox-check": "needs a configured partner FHIR server (tests/exchange/test_cli_sandbox.py)",
    "deliveries": "needs a dead delivery with id 42 (tests/test_cli.py covers the commands)",
}
#: ``<task id>`` in an example: the referral the earlier examples sent, as staff find it.
TASK_ID = """KAT_TASK_ID=$(curl -s "http://127.0.0.1:8080/fhir/Task?_count=1" \\
  -H "Authorization: Bearer $TOKEN" \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')"""
PREAMBLE = """set -euo pipefail
# Any HTTP error fails the example (curl -s alone would not).
curl() { command curl --fail-with-body --show-error "$@"; }
"""


def examples(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, text, reason it is not run, or None) for each shell block of ``path``."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            before = next((x for x in reversed(lines[:start]) if x.strip()), "")
            marker = NOT_RUN.match(before.strip())
            found.append((start + 1, "\n".join(body), marker.group(1) if marker else None))
        i += 1
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Checkout:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def localise(self, text: str) -> str:
        return text.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}").replace(
            "<task id>", "$KAT_TASK_ID"
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAT_")}
        env["FHIR_KAT_URL"] = self.url + "/fhir"
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
        return env

    def run(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", PREAMBLE + script],
            cwd=self.folder,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checkout]:
    # ./run.sh reinstalls when its stamp for this pyproject.toml is missing; from the scratch
    # folder that would point the shared .venv's editable install at a temporary path. The
    # suite runs through ./run.sh test, which leaves the stamp: without it, stop here.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if not (ROOT / ".venv" / f".installed-{digest}").exists():
        pytest.fail(
            "run the suite through ./run.sh test (.venv is not installed for this pyproject.toml)"
        )
    folder = tmp_path_factory.mktemp("checkout")
    for name in ("run.sh", "server.py", "pyproject.toml", "docs", ".venv", "fhir_kat", "mappings"):
        (folder / name).symlink_to(ROOT / name)
    port = _free_port()
    here = Checkout(folder, port)
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        ["./run.sh", "serve", "--port", str(port)],
        cwd=folder,
        env=here.env(),
        stdout=subprocess.DEVNULL,
        stderr=log,  # a file, not a pipe: nobody reads it until the end
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(here.url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            server.kill()
            server.wait(timeout=30)
            text = (folder / "server.log").read_text()[-2000:]
            raise AssertionError(f"./run.sh serve did not start: {text}")
        yield here
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_every_example_is_run_or_says_why_not() -> None:
    for path in DOCUMENTS:
        for line, text, reason in examples(path):
            assert text.strip(), f"{path.name}:{line}: an empty example"
            assert reason is None or len(reason) > 10, f"{path.name}:{line}: say why not"


def test_the_documents_shell_examples_run(checkout: Checkout) -> None:
    script = []
    ran = 0
    for path in DOCUMENTS:
        for line, text, reason in examples(path):
            if reason is not None:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if "<task id>" in text:
                # The referral the README's example sent, as staff find it.
                script.append(TASK_ID)
            script.append(f"echo '### {where}' >&2")
            script.append(text)
            ran += 1
    assert ran >= 5
    done = checkout.run(checkout.localise("\n".join(script)))
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n--- stdout ---\n{done.stdout[-2000:]}"


def _help_examples() -> list[tuple[str, str]]:
    parser = build_parser()
    found = []
    for action in parser._actions:  # the subcommands' own parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                epilog = sub.epilog or ""
                if "Example: " in epilog:
                    found.append((name, epilog.split("Example: ", 1)[1].strip()))
    return found


def test_every_command_has_an_example() -> None:
    names = {name for name, _ in _help_examples()}
    assert {"export", "map", "validate", "generate", "outcomes", "demo"} <= names


@pytest.mark.parametrize(("command", "example"), _help_examples(), ids=lambda x: str(x)[:20])
def test_the_help_examples_run(checkout: Checkout, command: str, example: str) -> None:
    if command in HELP_NOT_RUN:
        pytest.skip(HELP_NOT_RUN[command])
    assert "fhir-kat" in shlex.split(example.replace("&&", " ")), example
    setup = ""
    if command == "hash-secret":
        setup = "SECRET=an-example-secret-of-enough-length\n"
    if command == "reindex" or command == "outcomes":
        setup = "export FHIR_KAT_DATA_DIR=var\n"
    done = checkout.run(setup + checkout.localise(example), timeout=300)
    assert done.returncode == 0, f"{example}\n{done.stderr[-3000:]}"
