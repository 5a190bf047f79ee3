"""Command line: ``python -m vlmcourse doctor [--profile cpu] [--data ROOT]``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmcourse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doc = commands.add_parser("doctor", help="check the environment, the data and the pretrained parts")
    doc.add_argument("--profile", help="cpu (default, offline), hub or tiny; default $VLMCOURSE_PROFILE")
    doc.add_argument("--data", help="the Flickr8k folder; default $VLMCOURSE_DATA, then ../shared/flickr8k-subset")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor

        return doctor(args.profile, args.data)
    return 2


if __name__ == "__main__":
    sys.exit(main())
