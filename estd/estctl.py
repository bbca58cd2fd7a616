"""``estctl``: the operator's command-line companion of estd."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence

from estd import __version__
from estd.demo import write_demo


def _demo(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.directory, "est.ini")) and not args.force:
        print(
            f"estctl: {args.directory}/est.ini exists; "
            "use --force to overwrite the demo PKI",
            file=sys.stderr,
        )
        return 1
    pki = write_demo(
        args.directory, datetime.datetime.now(datetime.UTC), args.devices, args.port
    )
    device = pki.devices[0].certificate.subject.rfc4514_string()
    print(f"demo PKI written to {args.directory}/")
    print(f"  est.ini          server settings (listens on 127.0.0.1:{args.port})")
    print("  factory_ca.pem   factory root (trust it to reach the server)")
    print("  est-ca.pem/.key  EST CA that signs renewed device certificates")
    print("  client-cas.pem   device CA trusted for client authentication")
    print("  local-tls.pem    server certificate for localhost and 127.0.0.1")
    print(f"  device.pem/.key  a device certificate: {device}")
    print(f"run: twistd -n est --config {os.path.join(args.directory, 'est.ini')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The estctl argument parser."""
    parser = argparse.ArgumentParser(prog="estctl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"estctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="write a demo PKI and est.ini into a directory",
        description="Write a self-made PKI shaped like a Foundries factory's "
        "(root, EST CA, device CA, TLS certificate, device certificates) "
        "and an est.ini that uses it.",
    )
    demo.add_argument("directory", help="directory to write into (created if missing)")
    demo.add_argument(
        "--devices", type=int, default=1, help="device certificates to make"
    )
    demo.add_argument("--port", type=int, default=8443, help="port for est.ini")
    demo.add_argument("--force", action="store_true", help="overwrite an existing demo")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run estctl; returns the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
