"""``bundlerec`` command line: recommend / search / info / health against a running server.

    bundlerec recommend "pasta sauce" [--user U] [--target HOST:PORT]   # prints bundles as they stream in
    bundlerec search "pasta sauce" -k 5
    bundlerec info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from google.protobuf import json_format

from .client import TLS, Client, item_count
from .errors import BundleRecError
from .v1 import bundlerec_pb2 as pb


def _money(value: float) -> str:
    return f"${value:,.2f}"


def print_bundle(bundle: pb.Bundle, elapsed_ms: float, out: TextIO) -> None:
    price = f"  total {_money(bundle.total_price)}" if bundle.HasField("total_price") else ""
    out.write(f"#{bundle.rank}  score {bundle.score:.4f}{price}  [{elapsed_ms:.1f} ms]  {bundle.reason}\n")
    for item in bundle.items:
        role = "anchor    " if item.role == pb.ITEM_ROLE_ANCHOR else "complement"
        cat = f" ({item.category})" if item.category else ""
        cost = f" {_money(item.price)}" if item.HasField("price") else ""
        out.write(f"    {role} {item.item_id:>10}  {item.title}{cat}{cost}  [{item.score:.3f}]\n")
    out.flush()


def _bought(text: str) -> pb.ItemCount:
    """``ITEM_ID:COUNT[:DAYS_AGO]`` (the id may itself contain ':'; the count and days are the last fields)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[0]:
        try:
            return item_count(parts[0], int(parts[1]), last_seen=time.time() - float(parts[2]) * 86400.0)
        except ValueError:
            pass  # an id with ':' and no days
    try:
        item, count = text.rsplit(":", 1)
        return item_count(item, int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ITEM_ID:COUNT or ITEM_ID:COUNT:DAYS_AGO") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bundlerec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("BUNDLEREC_TARGET", "localhost:50051"), help="server HOST:PORT, or replicas as ipv4:IP:PORT,IP:PORT or dns:///NAME:PORT (balanced round-robin; env BUNDLEREC_TARGET)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print protobuf JSON, one message per line")
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM) to verify the server: enables TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    parser.add_argument("--token", default=os.environ.get("BUNDLEREC_TOKEN"), help="bearer token (env BUNDLEREC_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("recommend", help="stream bundles for a query")
    rec.add_argument("query")
    rec.add_argument("--user", default="", help="shopper id (personalizes with their recorded events)")
    rec.add_argument("--recent", nargs="*", default=[], metavar="ITEM_ID", help="recently viewed/bought item ids")
    rec.add_argument("--bought", action="append", default=[], type=_bought, metavar="ITEM_ID:COUNT[:DAYS_AGO]",
                     help="purchase count of an item (and days since the last purchase); repeat for each item")
    rec.add_argument("-n", "--max-bundles", type=int, default=0)
    rec.add_argument("--items", type=int, default=0, help="items per bundle, anchor included")
    rec.add_argument("--include-category", action="append", default=[])
    rec.add_argument("--exclude-category", action="append", default=[])
    rec.add_argument("--exclude-item", action="append", default=[])
    rec.add_argument("--max-price", type=float, default=None, help="maximum bundle price")
    rec.add_argument("--mode", choices=["default", "dense", "lexical", "hybrid"], default=None)

    search = sub.add_parser("search", help="retrieve items for a query")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--mode", choices=["default", "dense", "lexical", "hybrid"], default=None)

    sub.add_parser("info", help="what the server is serving")
    health = sub.add_parser("health", help="grpc.health.v1 status (exit 0 only when SERVING)")
    health.add_argument("--service", default="")
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    tls = None
    if args.ca or args.cert:
        tls = TLS(
            root_certificates=args.ca.read_bytes() if args.ca else None,
            private_key=args.key.read_bytes() if args.key else None,
            certificate_chain=args.cert.read_bytes() if args.cert else None,
        )
    with Client(args.target, timeout=args.timeout, tls=tls, token=args.token) as client:
        if args.command == "recommend":
            t0 = time.perf_counter()
            stream = client.recommend(
                args.query, user_id=args.user, recent_item_ids=args.recent, recent_item_counts=args.bought,
                max_bundles=args.max_bundles,
                max_items_per_bundle=args.items, include_categories=args.include_category,
                exclude_categories=args.exclude_category, exclude_item_ids=args.exclude_item,
                max_bundle_price=args.max_price, retrieval_mode=args.mode,
            )
            if not args.json:
                out.write(f'Bundles for "{args.query}":\n')
            for bundle in stream:
                if args.json:
                    out.write(json.dumps(json_format.MessageToDict(bundle)) + "\n")
                else:
                    print_bundle(bundle, (time.perf_counter() - t0) * 1000, out)
            s = stream.summary
            if args.json and s is not None:
                out.write(json.dumps({"summary": json_format.MessageToDict(s)}) + "\n")
            elif s is not None:
                reason = pb.StopReason.Name(s.stop_reason).removeprefix("STOP_REASON_").lower()
                extra = f", unknown history ids: {', '.join(s.unknown_item_ids)}" if s.unknown_item_ids else ""
                out.write(
                    f"-- {s.bundles_sent} bundles, stopped: {reason}, personalized: {str(s.personalized).lower()}, "
                    f"server {s.server_ms:.1f} ms, artifact {s.artifact_version}{extra}\n"
                )
        elif args.command == "search":
            hits = client.search(args.query, args.k, retrieval_mode=args.mode)
            for i, hit in enumerate(hits, 1):
                if args.json:
                    out.write(json.dumps(json_format.MessageToDict(hit)) + "\n")
                else:
                    cat = f" ({hit.category})" if hit.category else ""
                    out.write(f"{i:>3}. {hit.score:.4f}  {hit.item_id:>10}  {hit.title}{cat}\n")
        elif args.command == "info":
            info = client.info()
            out.write(json.dumps(json_format.MessageToDict(info, always_print_fields_with_no_presence=True), indent=2) + "\n")
        elif args.command == "health":
            status = client.health(args.service)
            out.write(status + "\n")
            return 0 if status == "SERVING" else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BundleRecError as exc:
        print(f"bundlerec: {exc}", file=sys.stderr)
        for v in exc.field_violations:
            print(f"  {v.field}: {v.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `bundlerec recommend ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
