"""One module per command of ``run.py``; each has ``add_parser(subparsers)`` and the command's
function (``train``, ``demo``, ``fuse``, ``export``, ``evaluate``, ``downstream``, ``check_data``)."""

from . import check_data, demo, downstream, evaluate, export, fuse, train

COMMANDS = (demo, train, fuse, export, evaluate, downstream, check_data)
"""In the order ``run.py --help`` lists them."""

__all__ = ["COMMANDS"]
