"""The ``--malloc`` option the benchmark scripts share: glibc's allocator as it is, or ``run.py``'s."""

from __future__ import annotations

import argparse

from metaloss.allocator import retain_freed_memory

CHOICES = ("default", "retain")


def add_malloc_option(parser: argparse.ArgumentParser, default: str = "retain", note: str = "") -> None:
    """Add ``--malloc {default,retain}`` to ``parser``; ``note`` ends its help."""
    parser.add_argument(
        "--malloc",
        choices=CHOICES,
        default=default,
        help="retain: glibc keeps freed memory for reuse (metaloss.allocator.retain_freed_memory, as run.py "
        "does); default: glibc's own settings" + (f" ({note})" if note else ""),
    )


def apply_malloc_option(args: argparse.Namespace) -> None:
    """Apply ``args.malloc`` to this process (call it before the work allocates)."""
    if args.malloc == "retain":
        retain_freed_memory()
