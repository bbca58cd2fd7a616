"""The floor: a minimal pyOpenSSL TLS server, to calibrate this machine.

Issue 6 measured "a minimal pyOpenSSL server" doing only the mutual-TLS
handshake, on other hardware.  This is that server for the machine at hand:
one thread, blocking sockets, no Twisted, no HTTP parsing, no Python verify
callback (OpenSSL's own chain check against the device CAs), the same
certificate, key, protocol versions and (through ``OPENSSL_CONF``, as estd)
no session tickets.  After the handshake it reads once: a close_notify is
answered with one, anything else with a canned ``200`` (so the driver's
readiness poll and the ``handshake-anon`` case work).  What it costs per
handshake is the least any Python server on this pyOpenSSL can spend.

    python -m bench.refserver --pki DIR --port N
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from pathlib import Path

# Before OpenSSL initialises: the same settings file estd uses.
os.environ.setdefault(
    "OPENSSL_CONF",
    str(Path(__file__).resolve().parent.parent / "estd" / "openssl.cnf"),
)

from OpenSSL import SSL, crypto

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    b"Connection: close\r\n\r\nok\n"
)


def context(pki: Path) -> SSL.Context:
    """TLS 1.2+, the demo PKI's server certificate, client certificates asked
    for (not required) and checked by OpenSSL against estd's anchors (the
    client CAs and the EST CA, each standing alone: partial chains)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(pki / "local-tls.pem"))
    ctx.use_privatekey_file(str(pki / "local-tls.key"))
    ctx.load_verify_locations(str(pki / "client-cas.pem"))
    ctx.load_verify_locations(str(pki / "est-ca.pem"))
    store = ctx.get_cert_store()
    assert store is not None
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def serve(listener: socket.socket, ctx: SSL.Context) -> None:
    """Handle connections one at a time, for ever."""
    while True:
        sock, _ = listener.accept()
        tls = SSL.Connection(ctx, sock)
        tls.set_accept_state()
        try:
            tls.do_handshake()
            try:
                if tls.recv(16384):
                    tls.sendall(RESPONSE)
            except SSL.ZeroReturnError:
                pass
            tls.shutdown()
        except (SSL.Error, OSError):
            pass
        finally:
            sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pki", type=Path, required=True, help="an estctl demo dir")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    serve(listener, context(args.pki))


if __name__ == "__main__":
    main()
