"""Test peers for the network layer: a (TLS) echo server, a byte sink and a TLS client.

They work on sockets the caller creates, so a test can create them inside a namespace
(``with entered(ns): sock = socket.socket()``) and the helpers never need to know.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHUNK = 16 * 1024


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway EC certificate and key (PEM files in ``folder``) for the echo server."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("echo.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "echo.crt", folder / "echo.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_contexts(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts; the client trusts exactly the server's certificate."""
    cert, key = self_signed(folder)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    client.check_hostname = (
        False  # the peer is whatever address the proxy gives; the cert is pinned
    )
    return server, client


class EchoServer:
    """Echo every byte back on each accepted connection (over TLS when given a context).

    ``errors`` collects what each connection ended with, other than a clean close, so a test
    can see the *server* noticed a corrupted or truncated stream.
    """

    def __init__(
        self, sock: socket.socket, tls: ssl.SSLContext | None = None, *, sink: bool = False
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.sink = sink
        self.errors: list[BaseException] = []
        self.received = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        sock.listen(16)
        sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True, name="echo")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def target(self) -> str:
        """``host:port``, as proxies take it."""
        host, port = self.address
        return f"{host}:{port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        conn: socket.socket = raw
        try:
            if self.tls is not None:
                # ragged EOFs are errors: a truncated stream must never look like a clean close
                conn = self.tls.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
            while data := conn.recv(65536):
                with self._lock:
                    self.received += len(data)
                if not self.sink:
                    conn.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.errors.append(exc)
        finally:
            conn.close()

    def wait_errors(self, n: int = 1, timeout: float = 10) -> list[BaseException]:
        deadline = time.monotonic() + timeout
        while len(self.errors) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.errors)

    def wait_received(self, n: int, timeout: float = 30) -> None:
        """Wait until connections have delivered ``n`` bytes in total."""
        deadline = time.monotonic() + timeout
        while self.received < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.received} of {n} bytes arrived")
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def listening(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def exchange(
    sock: socket.socket, payload: bytes, *, chunk: int = CHUNK
) -> tuple[bytes, BaseException | None]:
    """Send ``payload`` chunk by chunk, reading each chunk's echo before the next.

    Returns what came back and the error that stopped the exchange (None when it completed or
    the peer closed). Works for TLS sockets, which must not be read and written concurrently.
    """
    got = bytearray()
    try:
        for start in range(0, len(payload), chunk):
            piece = payload[start : start + chunk]
            sock.sendall(piece)
            want = len(got) + len(piece)
            while len(got) < want:
                data = sock.recv(want - len(got))
                if not data:
                    return bytes(got), None
                got += data
    except (OSError, ssl.SSLError) as exc:
        return bytes(got), exc
    return bytes(got), None


def tls_client(sock: socket.socket, ctx: ssl.SSLContext, timeout: float = 20) -> ssl.SSLSocket:
    sock.settimeout(timeout)
    return ctx.wrap_socket(sock, suppress_ragged_eofs=False)


def roundtrip_time(sock: socket.socket, payload: bytes = b"x") -> float:
    """Seconds for ``payload`` to go out and come back whole."""
    start = time.monotonic()
    got, error = exchange(sock, payload)
    elapsed = time.monotonic() - start
    if error is not None or got != payload:
        raise AssertionError(f"echo failed: {error!r}, {len(got)} of {len(payload)} bytes")
    return elapsed


def send_all(sock: socket.socket, total: int) -> float:
    """Send ``total`` bytes and half-close; seconds it took the kernel to accept them all."""
    block = b"\0" * 65536
    start = time.monotonic()
    left = total
    while left:
        left -= sock.send(block[: min(left, len(block))])
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    return time.monotonic() - start
