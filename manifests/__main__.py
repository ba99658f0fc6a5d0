"""``python -m manifests inspect|validate|preview PATH``: look at and check a manifest."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from manifests.inspect import inspect
from manifests.preview import preview
from manifests.validate import validate


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m manifests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="rows, status counts, error reasons, sizes, annotators").add_argument(
        "path", help="manifest folder or URI")
    v = sub.add_parser("validate", help="check every invariant; exit 1 listing offending ids")
    v.add_argument("path", help="manifest folder or URI")
    v.add_argument("--no-decode", action="store_true", help="read image headers only (faster)")
    g = sub.add_parser("preview", help="PNG contact sheet: image | each condition, caption below")
    g.add_argument("path", help="manifest folder or URI")
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--rows", type=int, default=8,
                   help="how many manifest rows to show (the first N with --status), one per line (default: 8)")
    g.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    g.add_argument("--status", default="ok", choices=["ok", "error", "filtered", "all"],
                   help="rows with this status (default: ok); all: every row, failed ones as a tile with their reason")
    g.add_argument("--duplicates", default="skip", choices=["skip", "keep"],
                   help="skip (default) leaves out near duplicates, as training does; keep shows them, labelled")
    args = p.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect(args.path))
        elif args.command == "validate":
            problems = validate(args.path, decode=not args.no_decode)
            for problem in problems:
                print(problem)
            print(f"{args.path}: {'INVALID, ' + str(len(problems)) + ' problem(s)' if problems else 'valid'}")
            return 1 if problems else 0
        else:
            status = None if args.status == "all" else args.status
            sheet = preview(args.path, args.out, args.rows, args.tile, status, args.duplicates)
            print(f"preview: {sheet.path} ({len(sheet.rows)} rows)")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
