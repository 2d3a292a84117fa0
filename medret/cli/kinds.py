"""``medret kinds``: the kinds of file this installation reads, built in or from plugins."""

from __future__ import annotations

import argparse
import json
from typing import Any

from medret.cli.options import add_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json(parser, "one object per kind")


def describe_kinds() -> list[dict[str, Any]]:
    from medret import kinds

    out = []
    for k in kinds.all_kinds():
        if not k.routable:
            continue
        out.append(
            {
                "kind": k.name,
                "description": k.description,
                "patterns": list(k.patterns),
                "recipe": k.default_recipe or ("(the encoder's)" if k in kinds.indexed() else None),
                "query": k.query_mode,
                "listing": k.listing.value,
                "from": type(k).__module__,
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    rows = describe_kinds()
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    for r in rows:
        extra = [
            f"routes {' '.join(r['patterns'])}" if r["patterns"] else "",
            f"recipe {r['recipe']}" if r["recipe"] else "",
        ]
        extra.append(f"upload as kind={r['query']}" if r["query"] else "")
        print(f"{r['kind']:<13} {r['description']}")
        details = "; ".join(e for e in extra if e)
        print(f"{'':<13} {details + '; ' if details else ''}from {r['from']}")
    return 0
