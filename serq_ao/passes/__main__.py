"""``python -m serq_ao.passes [MODEL] [--layers N] [--json]``: print a model's dataflow plan.

The same as ``serq inspect``; the command line lives in serq_ao.cli.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from serq_ao.cli.main import main as serq_main

    return serq_main(["inspect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
