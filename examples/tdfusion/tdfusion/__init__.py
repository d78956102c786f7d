"""The TDFusion reference example (CVPR 2025, "Task-driven Image Fusion with Learnable Fusion Loss")
wired on the metaloss core: data sets, task networks, the commands of ``run.py``.

Modules:

- ``data``: ``Scene``, ``PairFiles``, ``FusionDataset`` (fusion and task views of a pair);
- ``datasets``: MSRS, FMB, M3FD, LLVIP and plain folders in their native layouts, ``check_pairs``;
- ``synthetic``: the procedural scenes of the demo; ``tasks``: SegFormer, U-Net and YOLOv8 with
  their losses; ``downstream``: the paper's downstream protocol; ``study``: fixed-map fusion,
  weight probes and paired intervals for the learned-against-fixed studies;
- ``catalog``: the known data sets and how options find their files; ``networks``: fusion
  networks and losses of TDFusion and its ablations; ``options``, ``cli_values``, ``run_config``:
  the command line; ``reports``: tables, summaries and figures;
- ``commands``: one module per command (``demo``, ``train``, ``fuse``, ``export``, ``evaluate``,
  ``downstream``, ``check_data``); ``cli``: the parser and ``main``.

``examples/tdfusion/run.py`` is the entry point. To import these modules from your own code, put
``examples/tdfusion`` on the import path (``sys.path.insert(0, "examples/tdfusion")``) and import
``tdfusion.datasets``, ``tdfusion.tasks`` and the rest.
"""
