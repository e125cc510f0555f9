"""``bundlerec-server --artifact DIR --port N`` (flags and BUNDLEREC_* variables: see --help)."""

from __future__ import annotations

import asyncio
import logging
import sys

from .artifact import ArtifactError
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.load(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"bundlerec-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .app import serve

    try:
        asyncio.run(serve(settings))
    except ArtifactError as exc:
        logging.getLogger("bundlerec_server").error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
