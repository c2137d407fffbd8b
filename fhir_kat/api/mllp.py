"""The MLLP listener: HL7 v2 messages over TCP (optionally TLS), answered one by one.

Owns: MLLP framing (HL7 v2 Appendix C, release 2: ``<VT>`` message ``<FS><CR>``), one thread
per connection, many messages per connection in order, the ACK of each written before the
next is read; TLS from certificate and key files, with client certificates required when a
client CA is configured (their SHA-256 fingerprint identifies the sender); bounds (the largest
message, an idle connection's lifetime). Everything about the message itself is
``V2ReferralService.receive``'s. Must not: read v2 fields or touch the store.

A frame larger than the limit, or bytes that are not MLLP, close the connection: there is no
message to acknowledge. A connection dropped before its ACK was sent leaves the message
processed and its ACK recorded: the sender's re-send gets the same ACK.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir_kat.services.v2_referrals import Peer, V2Result
from fhir_kat.settings import Settings, SettingsError

log = logging.getLogger("fhir_kat.mllp")
START = b"\x0b"
END = b"\x1c\r"

Handler = Callable[[bytes, Peer], V2Result]


@dataclass(frozen=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = 2575
    ssl_context: ssl.SSLContext | None = None
    idle_timeout: float = 300.0
    max_message_bytes: int = 1024 * 1024


def config_from_settings(settings: Settings) -> ListenerConfig:
    return ListenerConfig(
        host=settings.mllp_host,
        port=settings.mllp_port,
        ssl_context=tls_context(
            settings.mllp_tls_cert_file,
            settings.mllp_tls_key_file,
            settings.mllp_tls_client_ca_file,
        ),
        idle_timeout=float(settings.mllp_idle_timeout_seconds),
        max_message_bytes=settings.mllp_max_message_bytes,
    )


def tls_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext | None:
    """A server context (TLS 1.2 or later) from PEM files; None without a certificate."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SettingsError("mllp_tls_client_ca_file needs mllp_tls_cert_file and key")
        return None
    if not cert_file or not key_file:
        raise SettingsError("MLLP over TLS needs both mllp_tls_cert_file and mllp_tls_key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            context.load_verify_locations(client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"MLLP TLS files cannot be used ({type(exc).__name__})") from None
    return context


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.config.idle_timeout)
        certificate: str | None = None
        context = self.server.config.ssl_context
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True)
                der = sock.getpeercert(binary_form=True)
                certificate = hashlib.sha256(der).hexdigest() if der else None
            peer = Peer(str(self.client_address[0]), certificate)
            self._serve(sock, peer)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            return  # the sender went away or idled out; its next connection starts afresh
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self, sock: socket.socket, peer: Peer) -> None:
        limit = self.server.config.max_message_bytes
        buffer = bytearray()
        while not self.server.stopping.is_set():
            end = buffer.find(END)
            if end < 0:
                if len(buffer) > limit + 3:
                    log.warning("mllp frame over the limit; connection closed")
                    return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                continue
            frame = bytes(buffer[:end])
            del buffer[: end + len(END)]
            start = frame.find(START)
            if start < 0:
                log.warning("mllp frame without a start block; connection closed")
                return
            message = frame[start + 1 :]
            if len(message) > limit:
                log.warning("mllp message over the limit; connection closed")
                return
            result = self.server.handler(message, peer)
            sock.sendall(START + result.ack.encode(_charset(result.ack)) + END)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: ListenerConfig, handler: Handler) -> None:
        self.config = config
        self.handler = handler
        self.stopping = threading.Event()
        super().__init__((config.host, config.port), _Connection)


class MllpListener:
    """``start()`` in a thread (tests, embedding) or ``serve_forever()`` (``fhir-kat mllp``)."""

    def __init__(self, config: ListenerConfig, handler: Handler) -> None:
        self.server = _Server(config, handler)
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MllpListener:
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="mllp-listener", daemon=True
        )
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> MllpListener:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _charset(ack: str) -> str:
    """The ACK in the character set its MSH-18 names (that of the message it answers)."""
    first = ack.split("\r", 1)[0].split("|")
    declared = first[17] if len(first) > 17 else ""
    return {"8859/1": "latin-1", "8859/15": "iso8859-15"}.get(declared, "utf-8")
