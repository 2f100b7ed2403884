#!/usr/bin/env python3
"""
What one idle server-side TLS connection costs in C memory, by engine --
in one process, no sockets.

    PYTHONPATH=. python benchmarks/tls_connection_memory.py [--n 2000]

For each engine it makes N server connections with the relay's own context
(leeloo.tls.make_context for the ssl module; the same settings on a
pyOpenSSL context), completes a TLS 1.3 handshake with a client over memory
BIOs, passes an HTTP upgrade's worth of data each way, drops the client,
and reports the growth of glibc's heap in use (mallinfo2) per connection:

  ssl        leeloo.tls.TLSConnection (the ssl module: the system's OpenSSL)
  pyopenssl  OpenSSL.SSL.Connection (the OpenSSL bundled in cryptography)

and, for each, what a connection costs as soon as it is made.  Prints one
JSON line per engine.  Glibc only (mallinfo2).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from OpenSSL import SSL  # noqa: E402

from leeloo import tls  # noqa: E402
from leeloo.testca import LetsEncryptDirectory, ThrowawayCA  # noqa: E402

DOMAIN = "relay.leeloo.test"
REQUEST = b"GET /ws HTTP/1.1\r\nHost: relay.leeloo.test\r\n" + b"X-Padding: " + b"x" * 300 + b"\r\n\r\n"
RESPONSE = b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Padding: " + b"y" * 200 + b"\r\n\r\n"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    gc.collect()
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.set_alpn_protocols(["http/1.1"])
    return context


class StdlibServer:
    name = "ssl"

    def __init__(self, certificate: tls.Certificate) -> None:
        self.context = tls.make_context(certificate)

    def new(self):
        return tls.TLSConnection(self.context)


class PyOpenSSLServer:
    """
    The relay's settings before it moved to the ssl module.
    """

    name = "pyopenssl"

    def __init__(self, certificate: tls.Certificate) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_3_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_SINGLE_ECDH_USE)
        context.set_cipher_list(tls.INTERMEDIATE_CIPHERS.encode("ascii"))
        context.set_session_id(b"leeloo")
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.use_certificate(certificate.leaf)
        for intermediate in certificate.chain:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(certificate.key)
        context.set_alpn_select_callback(lambda c, offered: b"http/1.1")
        self.context = context

    def new(self):
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        return connection


def _pump(server, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    if data := outgoing.read():
        server.bio_write(data)
    while True:
        try:
            incoming.write(server.bio_read(2 ** 15))
        except SSL.WantReadError:
            return


def connect(engine, client: ssl.SSLContext):
    """
    A server connection of C{engine}, handshaken and past an upgrade.
    """
    server = engine.new()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname=DOMAIN)
    for _ in range(5):
        for step in (peer.do_handshake, server.do_handshake):
            try:
                step()
            except (ssl.SSLWantReadError, SSL.WantReadError):
                pass
            _pump(server, incoming, outgoing)
    peer.write(REQUEST)
    _pump(server, incoming, outgoing)
    assert server.recv(2 ** 15) == REQUEST
    server.send(RESPONSE)
    _pump(server, incoming, outgoing)
    assert peer.read(2 ** 15) == RESPONSE
    assert peer.version() == "TLSv1.3", peer.version()
    return server


def per_connection(make, n: int) -> float:
    for _ in range(20):
        make()
    before = heap_in_use()
    kept = [make() for _ in range(n)]
    after = heap_in_use()
    assert len(kept) == n
    return round((after - before) / n / 1024, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="connections per engine [2000]")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leeloo-tls-memory-") as tmp:
        authority = ThrowawayCA("bench")
        LetsEncryptDirectory(tmp).install(DOMAIN, authority.issue([DOMAIN]))
        certificate = tls.load_certificate(tmp, DOMAIN, time.time())
        client = client_context(authority.root_pem)
        for engine in (StdlibServer(certificate), PyOpenSSLServer(certificate)):
            print(json.dumps({
                "engine": engine.name,
                "openssl": ssl.OPENSSL_VERSION if engine.name == "ssl"
                else SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
                "connections": options.n,
                "kib_fresh": per_connection(engine.new, options.n),
                "kib_after_handshake": per_connection(lambda: connect(engine, client), options.n),
            }), flush=True)


if __name__ == "__main__":
    main()
