"""A stand-in referrer EMR on loopback: the FHIR server a referring clinic's EMR would be, for
``fhir-kat demo`` and the tests of the pushes to referrers (tests/test_referrer_push.py).

Owns: ``StandInEmr`` — one HTTP server bound to 127.0.0.1 on a free (or given) port that
records every transaction Bundle it is POSTed (with the path, so one server can stand in for
several clinics at ``/<clinic>/fhir``) and answers each like a FHIR server would
(``transaction-response``, ``200 OK`` per entry). ``stop()`` takes it off the network
(connections are refused); ``start()`` brings it back on the same port.

Must not: bind anything but loopback, or be configured as a real partner: it accepts anything.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class StandInEmr:
    def __init__(self) -> None:
        #: (path, Bundle) of every transaction received, in order.
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.port = 0
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        emr = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                bundle = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with emr.lock:
                    emr.received.append((self.path, bundle))
                reply = json.dumps(
                    {
                        "resourceType": "Bundle",
                        "type": "transaction-response",
                        "entry": [
                            {"response": {"status": "200 OK", "location": "Task/1/_history/1"}}
                            for _ in bundle.get("entry", [])
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is None or self.thread is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        self.server = None

    def resources(self, rtype: str, clinic: str | None = None) -> list[dict[str, Any]]:
        """Every ``rtype`` received (for ``clinic``: at paths under ``/<clinic>/``), in order."""
        with self.lock:
            received = list(self.received)
        return [
            entry["resource"]
            for path, bundle in received
            if clinic is None or path.strip("/").split("/")[0] == clinic
            for entry in bundle.get("entry", [])
            if entry.get("resource", {}).get("resourceType") == rtype
        ]

    def clinics(self) -> list[str]:
        """The first path segment of every transaction received: the clinics sent to."""
        with self.lock:
            return sorted({path.strip("/").split("/")[0] for path, _ in self.received})
