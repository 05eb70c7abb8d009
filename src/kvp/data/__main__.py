"""Command line: ``python -m kvp.data regenerate [--out data] [--check]`` and
``python -m kvp.data validate FILE``.

``regenerate`` rebuilds the frozen test sets (``kvp.data.frozen.FROZEN``) byte for byte; with
``--check`` it writes into a temporary directory and exits with status 1 if any committed file
differs. ``validate`` checks a user JSONL file (:mod:`kvp.data.jsonl`) and lists every problem.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kvp.data.frozen import FROZEN, regenerate
from kvp.data.jsonl import JsonlError, read_jsonl


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


def validate(path: Path) -> int:
    """0 and a one-line summary if ``path`` is a valid JSONL dataset, else 1 and its problems."""
    if not path.is_file():
        print(f"error: {path} does not exist; pass the path of a .jsonl file", file=sys.stderr)
        return 1
    try:
        samples = read_jsonl(path)
    except JsonlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    docs = sum(len(s.documents) for s in samples)
    print(f"ok: {path} holds {len(samples)} samples with {docs} documents")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvp.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("regenerate", help="rebuild the frozen test sets under data/")
    cmd.add_argument("--out", type=Path, default=Path("data"), help="data directory (default: data)")
    cmd.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    val = sub.add_parser("validate", help="check a JSONL dataset file; exit 1 listing its problems")
    val.add_argument("file", type=Path, help="one sample per line (see kvp.data.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "validate":
        return validate(args.file)
    if args.check:
        return check(args.out)
    for path in regenerate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
