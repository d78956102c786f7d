"""Options that several commands share: ``--device`` and the training options of Algorithm 1."""

from __future__ import annotations

import argparse

import torch

from metaloss.map_gradient import MAP_GRADIENTS
from metaloss.meta_step import SECOND_ORDERS, VIRTUAL_STEPS

from .catalog import DATASETS
from .cli_values import at_least, device, non_negative_float, positive_float
from .networks import ABLATIONS, GENERATORS
from .tasks import TASK_KINDS

__all__ = ["add_device_option", "add_training_options"]


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device``: cpu, cuda or cuda:N (default: cuda when a GPU is present)."""
    p.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N"
    )


def add_training_options(p: argparse.ArgumentParser, demo_defaults: bool = False) -> None:
    """The options of Algorithm 1 that ``train`` and ``demo`` share (the demo's defaults fit a few
    CPU minutes; ``train``'s are the paper's)."""
    p.add_argument(
        "--dataset",
        choices=sorted(d for d in DATASETS if d != "folders"),  # unlabelled folders cannot train a task network
        default="synthetic",
        help="data set (default: synthetic, the embedded procedural scenes); training needs the task's labels, "
        "so plain --a/--b folders are for fuse, evaluate and check-data",
    )
    p.add_argument("--root", help="the data set's folder as downloaded")
    p.add_argument("--split-dir", help="folder with train.txt / test.txt name lists (M3FD; default: the paper's split)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (labels and boxes follow)")
    p.add_argument("--swap", action="store_true", help="double each batch with its (B, A)-swapped copy (released code)")
    p.add_argument(
        "--task-net",
        choices=sorted(TASK_KINDS),
        default="segformer",
        help="task network: segformer/unet (seg) or yolov8 (det)",
    )
    p.add_argument("--epochs", type=at_least(1), default=5 if demo_defaults else 50, help="epochs L (paper: 50)")
    p.add_argument(
        "--meta-iterations",
        type=at_least(0),
        default=40 if demo_defaults else 200,
        help="meta iterations M per epoch (paper: 200)",
    )
    p.add_argument(
        "--meta-accumulation",
        type=at_least(1),
        default=2 if demo_defaults else 1,
        help="meta-train/meta-test pairs averaged into each outer step of G (paper: 1)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=at_least(0),
        default=1 if demo_defaults else 0,
        help="first epochs without meta phase, so T is trained when G starts learning (paper: 0)",
    )
    p.add_argument(
        "--frozen-loss-epochs",
        type=at_least(0),
        default=0,
        help="last epochs without meta phase: G keeps the loss it has learned, F and T go on training "
        "under it (paper: 0; docs/learned-loss-study.md, section 13)",
    )
    p.add_argument(
        "--model-iterations", type=at_least(0), default=None, help="ordinary iterations N per epoch (default: one pass)"
    )
    p.add_argument("--batch-size", type=at_least(1), default=2, help="batch size (paper: 2)")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=2e-3 if demo_defaults else 1e-4,
        help="Adam learning rate of F and T (paper: 1e-4)",
    )
    p.add_argument(
        "--inner-lr",
        type=positive_float,
        default=1e-3 if demo_defaults else 1e-4,
        help="step size of the virtual steps (released: F's lr)",
    )
    p.add_argument(
        "--task-inner-lr",
        type=positive_float,
        default=None,
        help="step size of T's virtual step (default: --inner-lr, as the released code)",
    )
    p.add_argument(
        "--task-adaptation",
        choices=("current_model", "virtual_model"),
        default="current_model",
        help="what T's virtual step learns from: current_model (paper: F as it is) or virtual_model (F after its "
        "virtual step, differentiated: the meta-gradient also asks how the loss changes what T learns)",
    )
    p.add_argument(
        "--inner-steps",
        type=at_least(1),
        default=1,
        help="virtual steps of F per meta iteration (paper: 1); more are unrolled (--mode exact) or differentiated "
        "implicitly (--mode implicit)",
    )
    p.add_argument(
        "--meta-test",
        choices=("held_out", "meta_train"),
        default="held_out",
        help="batch the task loss judges F' on: held_out (paper: the other half of the data) or meta_train (the "
        "batch F' stepped on)",
    )
    p.add_argument(
        "--outer",
        choices=("adam", "sgd", "max_normalized"),
        default="adam",
        help="G's update rule (released code: max_normalized)",
    )
    p.add_argument("--outer-lr", type=positive_float, default=3e-4 if demo_defaults else 1e-4, help="G's learning rate")
    p.add_argument(
        "--mode",
        choices=("exact", "finite_difference", "implicit"),
        default="exact",
        help="hypergradient: exact second order (unrolled), finite differences (one step, first-order memory) or "
        "implicit (at the parameters after --inner-steps steps, by conjugate gradients)",
    )
    p.add_argument(
        "--second-order",
        choices=SECOND_ORDERS,
        default="jvp",
        help="how --mode exact differentiates one virtual step of F: jvp (a forward-mode product of F, about half "
        "the memory), compiled_jvp (the same product compiled by torch.compile: a faster meta step after a "
        "compilation on the first one, needs a C++ compiler on the CPU) or double_backward (through F's backward; "
        "for a fusion network with an operation that has no forward-mode derivative). Equal up to rounding",
    )
    p.add_argument("--form", choices=("paper", "released"), default="paper", help="fusion-loss form")
    p.add_argument(
        "--alpha",
        type=non_negative_float,
        default=0.01 if demo_defaults else 1.0,
        help="gradient-term weight alpha (paper: 1; at 1 the paper-form gradient term drowns the weighted "
        "intensity term on the demo's scenes, and at 0.01 the per-pixel oracle map is the best map we know "
        "there, see docs/learned-loss-study.md)",
    )
    p.add_argument(
        "--generator",
        choices=GENERATORS,
        default="per_pixel",
        help="the loss generator G: per_pixel (the paper's network), global (one learned weight per source, "
        "the same at every pixel: the baseline a per-pixel loss should beat), unet (a U-Net that sees "
        "shapes tens of pixels across; not the paper's) or per_pixel+unet (the paper's network with the "
        "U-Net's logits added, starting as the paper's)",
    )
    p.add_argument(
        "--ablation",
        choices=sorted(ABLATIONS),
        default="none",
        help="; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()),
    )
    p.add_argument(
        "--prior-weights",
        type=positive_float,
        nargs=2,
        default=None,
        metavar=("W_INFRARED", "W_VISIBLE"),
        help="start the learned loss near these weights (summing to 1): G's logits are added to their "
        "logarithms (tdfusion.networks.LogitPrior); 0.95 0.05 starts near the fixed infrared-only loss "
        "(default: none, G as the paper has it)",
    )
    p.add_argument(
        "--loss-from",
        metavar="FILE",
        default=None,
        help="start the learned loss from a trained run's: its last.pt (or a file of the loss's state dict), "
        "with the same --generator and --prior-weights; with --warmup-epochs 0 and --frozen-loss-epochs "
        "equal to --epochs, F trains under that learned loss unchanged, at a fixed loss's cost "
        "(docs/learned-loss-study.md, section 15)",
    )
    p.add_argument(
        "--fixed-weights",
        type=non_negative_float,
        nargs=2,
        default=None,
        metavar=("W_INFRARED", "W_VISIBLE"),
        help="with --ablation I: the fixed weights of the two sources, summing to 1 (default 0.5 0.5, the "
        "paper's ablation); 1 0 trains the fusion network on the infrared intensities alone, the fixed "
        "baseline the demo's scenes favour most (docs/learned-loss-study.md, section 12)",
    )
    p.add_argument(
        "--balanced-task-loss",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="segmentation: weigh T's cross-entropy (and so the meta-objective) by median frequency balancing, "
        "so background pixels do not dominate G's meta-gradient (paper: off; see docs/learned-loss-study.md)",
    )
    p.add_argument(
        "--balanced-map-gradient",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="segmentation: weigh the meta-gradient on G's weight map pixel by pixel by its class's median "
        "frequency weight, so the few marking and target pixels ask as loudly as the road (paper: off; see "
        "docs/learned-loss-study.md)",
    )
    p.add_argument(
        "--class-weight-power",
        type=non_negative_float,
        default=1.0,
        metavar="P",
        help="the two balanced options' class weights are median frequency weights to the power P (default 1: "
        "median frequency balancing; 0.5: their square root, a gentler balance)",
    )
    p.add_argument(
        "--map-gradient",
        choices=MAP_GRADIENTS,
        default="full",
        help="G's meta-gradient on the weight map: full (paper); centred: its per-image mean removed; shift_removed: "
        "its part along a uniform brightening of F's output removed (docs/learned-loss-study.md)",
    )
    p.add_argument(
        "--virtual-step",
        choices=VIRTUAL_STEPS,
        default="output" if demo_defaults else "model",
        help="what the meta step's virtual step moves: model (paper: F's parameters, judged on the meta-test "
        "batch); output: F's fused image itself, pixel by pixel, judged on the meta-train batch, so each pixel's "
        "weight learns from what T wants at that pixel (docs/learned-loss-study.md, section 9)",
    )
    p.add_argument(
        "--output-lr",
        type=positive_float,
        default=0.5,
        help="per-pixel step of --virtual-step output (1/2 moves the intensity term's output to its weighted target)",
    )
    p.add_argument(
        "--standardize-task-input",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="T sees each fused image standardised (zero mean, unit variance), so G's meta-gradient cannot "
        "reward a globally darker source (paper: off; see docs/learned-loss-study.md)",
    )
    p.add_argument(
        "--crop", type=at_least(8), default=64 if demo_defaults else 256, help="fusion crop size (released: 256)"
    )
    p.add_argument(
        "--task-size", type=at_least(8), nargs=2, metavar=("H", "W"), help="task view size (default: per data set)"
    )
    p.add_argument("--synthetic-train", type=at_least(2), default=32, help="procedural training scenes")
    p.add_argument("--synthetic-test", type=at_least(1), default=32, help="procedural test scenes")
    add_device_option(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the forward passes (losses in float32)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute F's activations in the meta step's backward (saves memory with --mode finite_difference)",
    )
    p.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="F and G recompute each Restormer block (and G's U-Net, whole) in every backward pass instead of "
        "keeping its activations (ReFusion(checkpoint_blocks=True)); at batch 2 x 256^2 on a CPU a meta step's "
        "peak 2.7 GiB against 5.9, for 1.25x its time (docs/benchmarks.md)",
    )
    p.add_argument(
        "--compile-generator",
        action="store_true",
        help="compile G in place with torch.compile (faster forward and backward after a compilation on the first "
        "call; checkpoints keep its parameter names; needs a C++ compiler on the CPU). With --second-order "
        "compiled_jvp: a meta iteration 2.55-2.62x a plain one, against 2.63-2.72x eagerly, and about a tenth "
        "less time (docs/benchmarks.md)",
    )
    p.add_argument("--workers", type=at_least(0), default=0, help="data-loader workers")
    p.add_argument("--checkpoint-every", type=at_least(0), default=50, help="also checkpoint every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
