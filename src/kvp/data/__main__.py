"""Command line: ``python -m kvp.data regenerate [--out data] [--check]``.

Rebuilds the frozen test sets (``kvp.data.frozen.FROZEN``) byte for byte; with ``--check`` it
writes into a temporary directory and exits with status 1 if any committed file differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kvp.data.frozen import FROZEN, regenerate


def check(out_dir: Path) -> int:
    """0 if every frozen file under ``out_dir`` equals a fresh regeneration, else 1."""
    with tempfile.TemporaryDirectory() as tmp:
        regenerate(tmp)
        stale = [rel for rel in FROZEN
                 if not (out_dir / rel).is_file()
                 or (out_dir / rel).read_bytes() != (Path(tmp) / rel).read_bytes()]
    for rel in stale:
        print(f"differs or missing: {out_dir / rel}")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvp.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("regenerate", help="rebuild the frozen test sets under data/")
    cmd.add_argument("--out", type=Path, default=Path("data"), help="data directory (default: data)")
    cmd.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.out)
    for path in regenerate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
