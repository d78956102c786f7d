#!/usr/bin/env python
"""TDFusion on metaloss: train, fuse, evaluate; with no arguments, the embedded demo.

python examples/tdfusion/run.py                 # demo: procedural scenes, a few CPU minutes
python examples/tdfusion/run.py train --help
python examples/tdfusion/run.py fuse --weights CKPT --a IR_DIR --b VIS_DIR --out DIR
python examples/tdfusion/run.py evaluate --fused DIR [DIR ...] --a IR_DIR --b VIS_DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "metaloss-ultralytics"))
os.environ.setdefault("MPLBACKEND", "Agg")

import datasets as ds  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cli_values import at_least, check_paths, device, non_negative_float, positive_float  # noqa: E402
from data import (  # noqa: E402
    FusionDataset,
    PairFiles,
    Scene,
    SceneList,
    collate,
    collate_swapped,
    find_image,
    paired_files,
)
from run_config import expand_config, write_config  # noqa: E402
from study import OracleProbe, downstream_miou, fuse_arrays, fuse_scenes, scene_weights, weights_at  # noqa: E402
from synthetic import DET_CLASSES, SEG_CLASSES, make_scenes  # noqa: E402
from tasks import TASK_KINDS, StandardizedInput, build_task, median_frequency_weights  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from metaloss import ConstantWeights, CSVLogger, InnerSGD, LearnableLoss, MetaTrainer, MetaTrainerConfig, SourcesAdapter  # noqa: E402
from metaloss.checkpoint import save_safetensors  # noqa: E402
from metaloss.distributed import rank_and_world_size, unwrap  # noqa: E402
from metaloss.fusion import LossGenerator, ReFusion, load_released_weights, tdfusion_loss  # noqa: E402
from metaloss.fusion.export import OnnxFusion, export_onnx  # noqa: E402
from metaloss.fusion.image_io import (  # noqa: E402
    fused_chroma,
    has_colour,
    read_bgr,
    read_grey,
    to_ycrcb,
    write_grey,
    write_ycrcb_as_rgb,
)
from metaloss.fusion.metrics import METRICS, evaluate_fusion  # noqa: E402

# Section 4.1 of the paper and the released code: dataset -> (classes incl. background, task size).
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"seg": len(SEG_CLASSES), "det": len(DET_CLASSES), "task_size": (96, 128)},
    "msrs": {"seg": 9, "det": 3, "task_size": (240, 320)},
    "fmb": {"seg": 15, "task_size": (300, 400)},
    "m3fd": {"det": 6, "task_size": (192, 256)},
    "llvip": {"det": 1, "task_size": (256, 320)},
    "folders": {"task_size": (256, 256)},
}
ABLATIONS = {
    "none": "TDFusion as published",
    "I": "fixed w_a = w_b = 1/2 (no learnable loss)",
    "II": "no gradient term (alpha = 0)",
    "III": "the fusion network also learns from the task loss",
    "IV": "no separate fusion-learning phase",
    "V": "discriminative fusion: I_f = w_a * I_a + w_b * I_b; the weights' network learns from the task loss and the fixed w = 1/2 fusion loss",  # noqa: E501
}


class WeightedSumFusion(torch.nn.Module):
    """Ablation V: the fused image is ``w_a * A + w_b * B`` with weights from a trainable network."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = LossGenerator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :1], x[:, 1:]
        w = self.weights(a, b)
        return w[:, :1] * a + w[:, 1:] * b


# --------------------------------------------------------------------------- building blocks
def build_loss(args: argparse.Namespace) -> LearnableLoss:
    """The learnable fusion loss for the chosen form, alpha and ablation."""
    alpha = 0.0 if args.ablation == "II" else args.alpha
    generator = ConstantWeights(2) if args.ablation in ("I", "V") else LossGenerator()
    return tdfusion_loss(generator, form=args.form, alpha=alpha)


def dataset_files(args: argparse.Namespace, split: str) -> list[PairFiles]:
    """The pairs of one split of a real data set, in its native layout."""
    if args.dataset == "folders":
        if not (getattr(args, "a", None) and getattr(args, "b", None)):
            raise SystemExit("--dataset folders needs --a DIR and --b DIR")
        return ds.folder_files(args.a, args.b)
    if args.root is None:
        raise SystemExit(f"--root is required for --dataset {args.dataset} (the folder as downloaded)")
    split_dir = Path(args.split_dir) if getattr(args, "split_dir", None) else None
    if args.dataset == "msrs":
        return ds.msrs_files(args.root, split)
    if args.dataset == "fmb":
        return ds.fmb_files(args.root, split)
    if args.dataset == "m3fd":
        return ds.m3fd_files(args.root, split, split_dir)
    if args.dataset == "llvip":
        return ds.llvip_files(args.root, split)
    raise SystemExit(f"unknown data set {args.dataset!r}")


def dataset_classes(name: str, kind: str) -> tuple[str, ...]:
    if name == "msrs":
        return ds.CLASSES["msrs" if kind == "seg" else "msrs_det"]
    if name == "synthetic":
        return SEG_CLASSES if kind == "seg" else DET_CLASSES
    return ds.CLASSES.get(name, ())


def load_scenes(args: argparse.Namespace, split: str, kind: str) -> list[Scene] | SceneList:
    if args.dataset == "synthetic":
        n = args.synthetic_train if split == "train" else args.synthetic_test
        return make_scenes(
            n, size=DATASETS["synthetic"]["task_size"], seed=args.seed, start=0 if split == "train" else 10_000
        )
    try:
        return SceneList(dataset_files(args, split), dataset_classes(args.dataset, kind))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{args.dataset}: {err}") from err


def _join_process_group(device: torch.device) -> torch.device:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU)
    and return this rank's device; otherwise ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group runs, else itself."""
    if rank_and_world_size()[1] == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def build_trainer(args: argparse.Namespace, callbacks: list[Any] | None = None) -> MetaTrainer:
    """F, G, T and Algorithm 1's schedule from the command-line options (nothing trained yet)."""
    torch.manual_seed(args.seed)
    device = _join_process_group(torch.device(args.device))
    kind = TASK_KINDS[args.task_net]
    spec = DATASETS[args.dataset]
    if kind not in spec:
        raise SystemExit(
            f"--dataset {args.dataset} has no {kind} labels; pick a task network for {[k for k in spec if k in ('seg', 'det')]}"  # noqa: E501
        )
    task = build_task(args.task_net, spec[kind])
    task_size = tuple(args.task_size) if args.task_size else spec["task_size"]
    if args.dataset != "synthetic":  # a bad label must not surface as a traceback mid-training
        check_training_data(args, "seg" if kind == "seg" else "det")
    scenes = load_scenes(args, "train", kind)
    if kind == "seg" and args.balanced_task_loss:
        task.loss.class_weights = median_frequency_weights([s.label_mask() for s in scenes], spec[kind])
    if args.standardize_task_input:
        task.model = StandardizedInput(task.model)
    dataset = FusionDataset(scenes, kind, crop=args.crop, task_size=task_size, flip=args.flip)
    model = _ddp((WeightedSumFusion() if args.ablation == "V" else ReFusion()).to(device), device)
    loss = build_loss(args).to(device)
    task_model = _ddp(task.model.to(device), device)
    config = MetaTrainerConfig(
        epochs=args.epochs,
        meta_iterations=args.meta_iterations,
        meta_accumulation=args.meta_accumulation,
        warmup_epochs=args.warmup_epochs,
        map_gradient=args.map_gradient,
        inner_steps=args.inner_steps,
        meta_test=args.meta_test,
        model_iterations=args.model_iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        outer_rule=args.outer,
        outer_lr=args.outer_lr,
        mode=args.mode,
        autocast_dtype="bfloat16" if args.bf16 else None,
        activation_checkpointing=args.activation_checkpointing,
        joint_task_weight=1.0 if args.ablation in ("III", "V") else 0.0,
        model_phase=args.ablation != "IV",
        seed=args.seed,
        num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    out = Path(args.out)
    trainer = MetaTrainer(
        model,
        loss,
        task_model,
        task.loss,
        dataset,
        config=config,
        collate_fn=collate_swapped if args.swap else collate,
        adapter=SourcesAdapter(keys=("a", "b"), task_keys=("task_a", "task_b")),
        inner=InnerSGD(args.inner_lr),
        task_inner=InnerSGD(args.inner_lr),
        callbacks=[CSVLogger(out / "logs"), *(callbacks or [])],
        checkpoint_dir=out,
    )
    return trainer


def train(args: argparse.Namespace, callbacks: list[Any] | None = None) -> MetaTrainer:
    """Train F, G and T with Algorithm 1; returns the trainer (its checkpoint is in --out).

    Under ``torchrun --nproc-per-node N`` every rank trains on its shard, F and T wrapped in
    DistributedDataParallel; rank 0 writes the checkpoints, logs and config.
    """
    trainer = build_trainer(args, callbacks)
    out = Path(args.out)
    if trainer.rank == 0:  # train --config OUT/config.yaml --out NEW repeats this run
        write_config(out / "config.yaml", args, SUBPARSERS["train"])
    resume = getattr(args, "resume", None)  # the demo has no --resume
    try:
        steps = trainer.fit(resume=resume)
    except (FileNotFoundError, ValueError) as err:
        if resume is None or trainer.global_step:
            raise
        raise SystemExit(f"--resume: {err}") from None
    if trainer.rank == 0:  # the fusion network alone, for deployment (fuse --weights reads it)
        save_safetensors(unwrap(trainer.model).state_dict(), out / "fusion.safetensors")
        if resume is not None and steps == 0:
            print(f"--resume: {resume} holds a finished run ({args.epochs} epochs); nothing left to train")
        if args.func is train:
            print(f"trained {steps} steps; wrote {out / 'last.pt'}, {out / 'fusion.safetensors'} and {out / 'logs'}")
    return trainer


def stretch(raw: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0-255, as the released inference saves its images."""
    lo, hi = float(raw.min()), float(raw.max())
    return (raw - lo) / (hi - lo + 1e-12) * 255.0


def matched_names(a_dir: Path, b_dir: Path) -> list[PairFiles]:
    """The pairs of two folders by stem (``data.paired_files``), as command-line errors."""
    try:
        pairs = paired_files(a_dir, b_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    except ValueError as err:
        raise SystemExit(f"these images have no partner in the other folder: {err}") from None
    if not pairs:
        raise SystemExit(f"no images in {a_dir}")
    return pairs


def load_fusion_network(path: str | os.PathLike[str]) -> torch.nn.Module:
    """ReFusion, or ablation V's weighted sum, whichever the checkpoint at ``path`` holds."""
    try:
        return load_released_weights(ReFusion(), path)
    except ValueError as refusion_error:
        try:
            return load_released_weights(WeightedSumFusion(), path)
        except ValueError:
            raise refusion_error from None  # name the network the user most likely meant


def fuse(args: argparse.Namespace) -> Path:
    """Fuse one pair or two folders with our checkpoint, the authors' released weights, or (with
    ``--backend onnxruntime``) an exported ONNX file."""
    device = torch.device(args.device if args.backend == "torch" else "cpu")
    try:
        if args.backend == "onnxruntime":
            model: Any = OnnxFusion(args.weights)
        else:
            model = load_fusion_network(args.weights).to(device).eval()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--weights: {err}") from None
    out = Path(args.out)
    a, b = Path(args.a), Path(args.b)
    pairs = [PairFiles(a.stem, a, b)] if a.is_file() else matched_names(a, b)
    for pair in tqdm(pairs, desc="fuse", disable=args.quiet):
        name, pa, pb = pair.name, pair.a, pair.b
        bgr_a, bgr_b = read_bgr(pa), read_bgr(pb)
        if bgr_a.shape != bgr_b.shape:
            raise SystemExit(f"{pa} and {pb} differ in size: {bgr_a.shape[:2]} vs {bgr_b.shape[:2]}")
        ya, yb = to_ycrcb(bgr_a), to_ycrcb(bgr_b)
        raw = fuse_arrays(model, ya[..., 0], yb[..., 0], device)
        grey = stretch(raw)
        write_grey(out / f"{name}.png", grey)
        if args.raw:
            np.save(out / f"{name}.npy", raw.astype(np.float32))
        crcb = fused_chroma(ya, has_colour(bgr_a), yb, has_colour(bgr_b))
        if crcb is not None:
            write_ycrcb_as_rgb(out / "rgb" / f"{name}.png", grey, crcb)
    return out


def export(args: argparse.Namespace) -> Path:
    """Write a fusion checkpoint (ours or the authors') as ONNX or as safetensors."""
    try:
        model = load_fusion_network(args.weights).eval()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--weights: {err}") from None
    if args.format == "onnx":
        return export_onnx(model, args.out)
    return save_safetensors(model.state_dict(), args.out)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The six metrics for each --fused folder; metrics.json, CSV and a markdown table in --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    methods: dict[str, Any] = {}
    pairs = matched_names(Path(args.a), Path(args.b))
    for name, folder in method_names(args.fused).items():
        rows = []
        for pair in tqdm(pairs, desc=f"evaluate {name}", disable=args.quiet):
            pf = find_image(folder, pair.name)
            if pf is None:
                raise SystemExit(f"{folder} has no fused image for {pair.name}")
            f, a, b = (torch.from_numpy(read_grey(p)).to(device) for p in (pf, pair.a, pair.b))
            try:
                values = evaluate_fusion(f, a, b, args.convention)
            except ValueError as err:  # sizes that differ, an image too small for VIF
                raise SystemExit(f"{pf}: {err}") from None
            rows.append({"name": pair.name, **{k: float(v[0]) for k, v in values.items()}})
        mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
        methods[name] = {"folder": str(folder), "convention": args.convention, "images": rows, "mean": mean}
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "metrics.json").write_text(json.dumps(methods[name], indent=2))
    write_comparison(out, {k: v["mean"] for k, v in methods.items()}, args.convention)
    return methods


def method_names(specs: list[str]) -> dict[str, Path]:
    """A unique name per ``--fused`` folder: ``NAME=DIR`` as given, else the shortest trailing
    part of the path that tells it from the others (``runA/fused`` and ``runB/fused`` become
    ``runA_fused`` and ``runB_fused``). Two folders that cannot be told apart are an error."""
    given: list[tuple[str | None, Path]] = []
    for spec in specs:
        head, sep, rest = spec.partition("=")
        given.append((head, Path(rest)) if sep and head and "/" not in head else (None, Path(spec)))
    resolved = [p.resolve() for _, p in given]
    if len(set(resolved)) != len(resolved):
        raise SystemExit("--fused: the same folder is given twice")
    names: dict[str, Path] = {}
    for (given_name, folder), full in zip(given, resolved):
        name = given_name or ""
        if given_name is None:
            others = [r for r in resolved if r != full]
            for depth in range(1, len(full.parts) + 1):
                name = "_".join(full.parts[-depth:])
                if not any("_".join(o.parts[-depth:]) == name for o in others):
                    break
        if name in names:
            raise SystemExit(f"--fused: two methods are named {name!r}; name them with NAME=DIR")
        names[name] = folder
    return names


def write_comparison(out: Path, means: dict[str, dict[str, float]], convention: str) -> None:
    """metrics.json (one method) or a comparison table (several), CSV and markdown, best in bold."""
    if len(means) == 1:
        (out / "metrics.json").write_text(json.dumps(next(iter(json.loads(json.dumps(means)).values())), indent=2))
    cols = list(METRICS)
    best = {c: max(m[c] for m in means.values()) for c in cols}
    lines = [
        f"Fusion metrics (two-source convention: {convention}; higher is better, best in bold)",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    csv = ["method," + ",".join(cols)]
    for name, m in means.items():
        cells = [f"**{m[c]:.4f}**" if m[c] == best[c] else f"{m[c]:.4f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        csv.append(name + "," + ",".join(f"{m[c]:.6f}" for c in cols))
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.csv").write_text("\n".join(csv) + "\n")
    write_bar_chart(out / "comparison.png", means, convention)


def write_bar_chart(path: Path, means: dict[str, dict[str, float]], convention: str) -> None:
    """One panel per metric, one bar per method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(2.4 * len(METRICS), 3))
    names = list(means)
    for ax, metric in zip(axes, METRICS):
        ax.bar(range(len(names)), [means[n][metric] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_title(metric)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    fig.suptitle(f"fusion metrics ({convention} convention)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------- demo
ARMS = (("tdfusion", "none"), ("fixed_half", "I"))
"""The demo's two arms: the learned loss and the fixed ``w = 1/2`` loss (ablation I)."""


def run_arms(
    args: argparse.Namespace, out: Path, probe: bool = False, arms: Sequence[str] = ("tdfusion", "fixed_half")
) -> dict[str, Any]:
    """Train both arms on the procedural scenes and score each the paper's way (section 4.3).

    Per arm: train with Algorithm 1 (``--ablation I`` for the fixed arm), fuse the training and
    test scenes, train a fresh task network on the fused training scenes and score it on the
    fused test scenes; the six fusion metrics on the test scenes; for the learned arm, where its
    loss puts its weight (``study.weights_at``) and, with ``probe``, the per-epoch
    ``study.OracleProbe`` rows. ``arms`` picks the arms to run (by name, from ``ARMS``).
    """
    unknown = set(arms) - {name for name, _ in ARMS}
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {[name for name, _ in ARMS]}")
    train_scenes = load_scenes(args, "train", "seg")
    test_scenes = load_scenes(args, "test", "seg")
    results: dict[str, Any] = {}
    for method, ablation in ARMS:
        if method not in arms:
            continue
        if not args.quiet:
            print(f"[demo] training {method}: {ABLATIONS[ablation]}", flush=True)
        run_args = argparse.Namespace(**{**vars(args), "ablation": ablation, "out": str(out / method), "resume": None})
        callbacks: list[Any] = []
        if probe and ablation == "none":
            callbacks.append(OracleProbe(_probe_pairs(run_args, train_scenes), test_scenes, out / method / "probe.csv"))
        t0 = time.time()
        trainer = train(run_args, callbacks)
        seconds = time.time() - t0
        fused_train, fused_test = fuse_scenes(trainer.model, train_scenes), fuse_scenes(trainer.model, test_scenes)
        for s, f in zip(test_scenes, fused_test):
            write_grey(out / method / "fused" / f"{s.name}.png", f)
        t0 = time.time()
        scores = downstream_miou(
            fused_train,
            train_scenes,
            fused_test,
            test_scenes,
            epochs=args.task_epochs,
            seed=args.seed,
            task_net=args.task_net,
            progress=not args.quiet,
        )
        metrics = evaluate_fusion(
            torch.from_numpy(np.stack(fused_test)),
            torch.from_numpy(np.stack([s.a for s in test_scenes])),
            torch.from_numpy(np.stack([s.b for s in test_scenes])),
        )
        results[method] = {
            "train_seconds": round(seconds, 1),
            "downstream_seconds": round(time.time() - t0, 1),
            "downstream": {"mIoU": scores["mIoU"], "per_class": {k: v["IoU"] for k, v in scores["per_class"].items()}},
            "fusion_metrics": {k: float(v.mean()) for k, v in metrics.items()},
        }
        if ablation == "none":
            results[method]["weights_at"] = weights_at(trainer.loss, test_scenes)
            if callbacks:
                results[method]["probe"] = callbacks[0].rows
            shown = [test_scenes[i] for i in range(min(4, len(test_scenes)))]
            write_weight_figure(out / "weights.png", trainer.loss, shown, fused_test[: len(shown)])
    return results


def _probe_pairs(args: argparse.Namespace, scenes: list[Scene] | SceneList) -> list[tuple[Any, Any]]:
    """Four fixed (meta-train, meta-test) pairs of training samples for ``study.OracleProbe``
    (the scenes cycle when there are fewer than eight batches of them)."""
    g = torch.Generator().manual_seed(12345)
    dataset = FusionDataset(scenes, "seg", crop=args.crop, task_size=DATASETS["synthetic"]["task_size"])
    state = torch.get_rng_state()
    torch.manual_seed(12345)  # the crops' windows; the global stream is restored below
    order = torch.randperm(len(dataset), generator=g).tolist()
    size = args.batch_size
    batches = [collate([dataset[order[(j + t) % len(order)]] for t in range(size)]) for j in range(0, 8 * size, size)]
    torch.set_rng_state(state)
    return list(zip(batches[0::2], batches[1::2]))


def demo(args: argparse.Namespace) -> Path:
    """Train TDFusion and the fixed-weight baseline on procedural scenes; score both; report."""
    if TASK_KINDS[args.task_net] != "seg":
        raise SystemExit(f"--task-net {args.task_net}: the demo scores segmentation (segformer or unet)")
    if args.dataset != "synthetic":
        raise SystemExit("the demo runs on --dataset synthetic; use train / fuse / downstream for real data sets")
    out = Path(args.out)
    started = time.time()
    results = run_arms(args, out)
    results["convention"] = "mean"
    results["task_net"] = args.task_net
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_demo_summary(out, results, time.time() - started)
    return out


def write_weight_figure(path: Path, loss: LearnableLoss, scenes: list[Scene], fused: list[np.ndarray]) -> None:
    """The learned w_infrared map beside the sources, the ground-truth regions and the fused image.

    The regions are where the oracle puts its weight: hot targets (infrared should win) and
    markings (visible light should win); like the paper's Fig. 5 with the answer beside it.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    weights = [scene_weights(loss, s) for s in scenes]
    regions = ListedColormap(["black", "tab:red", "tab:red", "tab:cyan"])
    fig, axes = plt.subplots(len(scenes), 5, figsize=(13, 2.3 * len(scenes)), squeeze=False)
    for row, (s, w, f) in enumerate(zip(scenes, weights, fused)):
        panels = (
            (s.a, "infrared A", "gray", 255),
            (s.b, "visible B", "gray", 255),
            (s.label_mask(), "truth: red = targets (want A),\ncyan = markings (want B)", regions, 3),
            (w[0], "learned w_infrared (1 - w_visible)", "coolwarm", 1),
            (f, "fused", "gray", 255),
        )
        for col, (img, title, cmap, vmax) in enumerate(panels):
            ax = axes[row, col]
            shown = ax.imshow(img, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_axis_off()
            if col == 3:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row, 0].text(2, 10, s.name, color="yellow", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def demo_verdict(results: dict[str, Any]) -> list[str]:
    """The demo's verdict in words, from the downstream mIoU and the learned weights (one seed)."""
    ours, base = results["tdfusion"], results["fixed_half"]
    gain = ours["downstream"]["mIoU"] - base["downstream"]["mIoU"]
    w = ours["weights_at"]
    maps_ok = w["target_infrared"] >= 0.7 and w["marking_visible"] >= 0.7
    lines = [
        f"**Verdict (this seed):** the learned loss {'beats' if gain > 0 else 'does not beat'} the fixed "
        f"w = 1/2 loss downstream: {ours['downstream']['mIoU']:.1f} against {base['downstream']['mIoU']:.1f} "
        f"mIoU ({gain:+.1f} points), and its maps {'do' if maps_ok else 'do not'} put the expected "
        f"weight on each source: w_infrared = {w['target_infrared']:.2f} on hot targets, w_visible = "
        f"{w['marking_visible']:.2f} on markings (the bar is 0.7 each).",
        "",
        "One seed is one draw: `python benchmarks/learned_vs_fixed.py --seeds 5` gives the mean over seeds "
        "with its 95% interval (docs/tdfusion.md has our measurement).",
    ]
    return lines


def write_demo_summary(out: Path, results: dict[str, Any], seconds: float) -> None:
    """summary.md: the downstream scores of both arms, the learned weights, the fusion metrics, the verdict."""
    ours, base = results["tdfusion"], results["fixed_half"]
    classes = list(ours["downstream"]["per_class"])
    lines = [
        "# TDFusion demo: learned loss against fixed w = 1/2 (ablation I)",
        "",
        f"Procedural paired scenes, {seconds:.0f} s in all on this machine. Each arm's fused training scenes "
        f"train a fresh {results.get('task_net', 'segformer')} that is scored on its fused test scenes "
        "(the paper's protocol, section 4.3).",
        "",
        *demo_verdict(results),
        "",
        "| downstream (IoU, %) | TDFusion | fixed w = 1/2 |",
        "|---|---|---|",
        f"| **mIoU** | **{ours['downstream']['mIoU']:.1f}** | **{base['downstream']['mIoU']:.1f}** |",
    ]
    for c in classes:
        lines.append(
            f"| {c} | {ours['downstream']['per_class'][c]:.1f} | "
            f"{base['downstream']['per_class'].get(c, float('nan')):.1f} |"
        )
    w = ours["weights_at"]
    lines += [
        "",
        "| where the learned loss puts its weight | all | day | night |",
        "|---|---|---|---|",
        f"| w_infrared on hot targets | {w['target_infrared']:.2f} | {w['target_infrared_day']:.2f} | "
        f"{w['target_infrared_night']:.2f} |",
        f"| w_visible on markings | {w['marking_visible']:.2f} | {w['marking_visible_day']:.2f} | "
        f"{w['marking_visible_night']:.2f} |",
        "",
        "| fusion metric ('mean' convention) | TDFusion | fixed w = 1/2 |",
        "|---|---|---|",
    ]
    for k in METRICS:
        lines.append(f"| {k} | {ours['fusion_metrics'][k]:.4f} | {base['fusion_metrics'][k]:.4f} |")
    lines += [
        f"| training time (s) | {ours['train_seconds']} | {base['train_seconds']} |",
        "",
        "`weights.png`: the learned w_infrared maps beside the sources and the ground-truth regions "
        "(red: hot targets, where infrared should win; cyan: markings, where visible light should win).",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def downstream(args: argparse.Namespace) -> dict[str, Any]:
    """The paper's protocol per method: train a fresh task network on the method's fused training
    images, score it on its fused test images; one comparison table (downstream.md / .json)."""
    from downstream import train_and_evaluate

    kind = TASK_KINDS[args.task_net]
    names = dataset_classes(args.dataset, kind)
    size = tuple(args.task_size) if args.task_size else DATASETS[args.dataset]["task_size"]
    scenes = {split: load_scenes(args, split, kind) for split in ("train", "test")}
    results: dict[str, Any] = {}
    for spec in args.method:
        try:
            name, train_dir, test_dir = spec.split(":")
        except ValueError:
            raise SystemExit(f"--method {spec!r}: expected NAME:TRAIN_FUSED_DIR:TEST_FUSED_DIR") from None
        images: dict[str, list[np.ndarray]] = {}
        for split, folder in (("train", Path(train_dir)), ("test", Path(test_dir))):
            images[split] = []
            for scene in scenes[split]:
                path = find_image(folder, scene.name)
                if path is None:
                    raise SystemExit(f"method {name}: {folder} has no fused image for {scene.name}")
                images[split].append(read_grey(path))
        torch.manual_seed(args.seed)
        task = build_task(args.task_net, len(names))
        task.model.to(args.device)
        print(f"[downstream] {name}: training {args.task_net} for {args.epochs} epochs", flush=True)
        results[name] = train_and_evaluate(
            task,
            images["train"],
            list(scenes["train"]),
            images["test"],
            list(scenes["test"]),
            names,
            size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=not args.quiet,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.json").write_text(json.dumps(results, indent=2))
    keys = ("IoU", "Acc") if kind == "seg" else ("AP50", "AP75")
    overall = ("mIoU", "mAcc") if kind == "seg" else ("mAP50", "mAP75")
    classes = [c for c in names if any(c in r["per_class"] for r in results.values())]
    lines = [
        f"Downstream {kind} with {args.task_net} ({args.epochs} epochs per method), in %",
        "",
        "| method | " + " | ".join(f"{c} {k}" for c in classes for k in keys) + " | " + " | ".join(overall) + " |",
        "|---" * (len(classes) * len(keys) + len(overall) + 1) + "|",
    ]
    for name, r in results.items():
        cells = [f"{r['per_class'].get(c, {}).get(k, float('nan')):.1f}" for c in classes for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(f"{r[o]:.1f}" for o in overall) + " |")
    (out / "downstream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def needed_labels(dataset: str, task_net: str | None) -> Literal["seg", "det"] | None:
    """The labels a run needs: the task network's kind, or the data set's default task's; none
    for ``folders`` (fusion only)."""
    if dataset == "folders":
        return None
    if task_net is not None:
        return TASK_KINDS[task_net]  # type: ignore[return-value]
    return "seg" if "seg" in DATASETS[dataset] else "det"


def check_training_data(args: argparse.Namespace, kind: Literal["seg", "det"]) -> None:
    """``check-data``'s checks on the training split, before ``train`` starts; exits 1 naming
    every offending file (a missing label, an id outside the classes, a bad image)."""
    try:
        files = dataset_files(args, "train")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{args.dataset}: {err}") from None
    classes = dataset_classes(args.dataset, "seg"), dataset_classes(args.dataset, "det")
    report = ds.check_pairs(files, *classes, progress=not args.quiet, need=kind)
    if report.problems:
        shown = "\n  ".join(report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        raise SystemExit(f"{args.dataset} training data: {len(report.problems)} problem(s):\n  {shown}{more}")


def check_data(args: argparse.Namespace) -> None:
    """Per split: pair count, image sizes, class histogram; exit 1 naming every offending file."""
    splits = ["all"] if args.dataset == "folders" else ["train", "test"]
    seg_classes = dataset_classes(args.dataset, "seg")
    box_classes = dataset_classes(args.dataset, "det")
    need = needed_labels(args.dataset, args.task_net)
    problems = []
    for split in splits:
        try:
            files = dataset_files(args, split)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"[{split}] {err}")
            continue
        if args.write_splits and args.dataset in ("m3fd", "llvip"):
            ds.write_split(
                Path(args.write_splits) / f"{split}.txt", [f.name for f in files], f"{args.dataset} {split} split"
            )
        report = ds.check_pairs(files, seg_classes, box_classes, progress=not args.quiet, need=need)
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in report.sizes.most_common())
        print(f"[{split}] {report.pairs} pairs; sizes {sizes or '-'}")
        for what, counts, names in (("label pixels", report.pixels, seg_classes), ("boxes", report.boxes, box_classes)):
            if counts:
                hist = ", ".join(f"{names[i] if i < len(names) else i}: {n}" for i, n in sorted(counts.items()))
                print(f"[{split}] {what} per class: {hist}")
        problems += [f"[{split}] {p}" for p in report.problems]
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        raise SystemExit(1)
    print("ok")


# ----------------------------------------------------------------------------------- CLI
def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N"
    )


def _train_options(p: argparse.ArgumentParser, demo_defaults: bool = False) -> None:
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
        default=20 if demo_defaults else 200,
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
    p.add_argument("--form", choices=("paper", "released"), default="paper", help="fusion-loss form")
    p.add_argument(
        "--alpha",
        type=non_negative_float,
        default=0.1 if demo_defaults else 1.0,
        help="gradient-term weight alpha (paper: 1; at 1 the paper-form gradient term drowns the weighted "
        "intensity term on the demo's scenes, see docs/tdfusion.md)",
    )
    p.add_argument(
        "--ablation",
        choices=sorted(ABLATIONS),
        default="none",
        help="; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()),
    )
    p.add_argument(
        "--balanced-task-loss",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="segmentation: weigh T's cross-entropy (and so the meta-objective) by median frequency balancing, "
        "so background pixels do not dominate G's meta-gradient (paper: off; see docs/tdfusion.md)",
    )
    p.add_argument(
        "--map-gradient",
        choices=("full", "centred"),
        default="full",
        help="G's meta-gradient: full (paper), or centred: its per-image global part removed (docs/tdfusion.md)",
    )
    p.add_argument(
        "--standardize-task-input",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="T sees each fused image standardised (zero mean, unit variance), so G's meta-gradient cannot "
        "reward a globally darker source (paper: off; see docs/tdfusion.md)",
    )
    p.add_argument(
        "--crop", type=at_least(8), default=64 if demo_defaults else 256, help="fusion crop size (released: 256)"
    )
    p.add_argument(
        "--task-size", type=at_least(8), nargs=2, metavar=("H", "W"), help="task view size (default: per data set)"
    )
    p.add_argument("--synthetic-train", type=at_least(2), default=32, help="procedural training scenes")
    p.add_argument("--synthetic-test", type=at_least(1), default=32, help="procedural test scenes")
    _device_option(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the forward passes (losses in float32)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute F's activations in the meta step's backward (saves memory with --mode finite_difference)",
    )
    p.add_argument("--workers", type=at_least(0), default=0, help="data-loader workers")
    p.add_argument("--checkpoint-every", type=at_least(0), default=50, help="also checkpoint every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


SUBPARSERS: dict[str, argparse.ArgumentParser] = {}
"""The commands' parsers by name, filled by :func:`build_parser`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="the embedded demo (the default): train, fuse, evaluate, report")
    _train_options(p, demo_defaults=True)
    p.add_argument("--task-epochs", type=at_least(1), default=30, help="epochs of each arm's fresh task network")
    p.add_argument("--out", default="tdfusion_out/demo", help="report folder")
    p.set_defaults(func=demo)
    p = sub.add_parser(
        "train", help="train TDFusion (resumable); writes last.pt, fusion.safetensors, config.yaml, logs/"
    )
    _train_options(p)
    p.add_argument("--resume", help="continue from a checkpoint (last.pt)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="settings from a YAML file (configs/, or a run's config.yaml); flags given here win over it",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings applied last (epochs=10 lr=2e-4)")
    p.set_defaults(func=train)
    SUBPARSERS["train"] = p
    p = sub.add_parser("fuse", help="fuse a pair or two folders with a checkpoint (ours or the authors' .pth)")
    p.add_argument(
        "--weights",
        required=True,
        help="our last.pt or fusion.safetensors (ReFusion, or --ablation V's weighted sum) or a released .pth: "
        "ReFusion_IVIF.pth "
        "(--a infrared, --b visible), ReFusion_MIF.pth (--a CT/PET/SPECT, --b MRI), ReFusion_MFIF.pth "
        "(--a near focus, --b far focus), ReFusion_MEIF.pth (--a under-exposed, --b over-exposed)",
    )
    p.add_argument("--a", required=True, help="first source image or folder (infrared for IVIF; see --weights)")
    p.add_argument("--b", required=True, help="second source image or folder, names matched by stem (visible for IVIF)")
    p.add_argument("--out", required=True, help="output folder: <name>.png grey (stretched to 0-255), rgb/<name>.png")
    p.add_argument("--raw", action="store_true", help="also write <name>.npy, the float32 network output")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="torch (a .pt/.pth/.safetensors checkpoint) or onnxruntime (an .onnx file from `export`; CPU)",
    )
    _device_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=fuse)
    p = sub.add_parser("export", help="write a fusion checkpoint as ONNX (dynamic height and width) or safetensors")
    p.add_argument("--weights", required=True, help="our checkpoint (last.pt, fusion.safetensors) or a released .pth")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx")
    p.add_argument("--out", required=True, help="the file to write (.onnx or .safetensors)")
    p.set_defaults(func=export)
    p = sub.add_parser("evaluate", help="six fusion metrics for one or several methods' fused folders")
    p.add_argument(
        "--fused",
        nargs="+",
        required=True,
        metavar="[NAME=]DIR",
        help="one folder per method; named NAME, else by the shortest distinguishing end of its path",
    )
    p.add_argument("--a", required=True, help="infrared folder")
    p.add_argument("--b", required=True, help="visible folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--convention",
        choices=("mean", "sum"),
        default="mean",
        help="two-source VIF/SSIM: mean (TDFusion) or sum (CDDFuse)",
    )
    _device_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=evaluate)
    p = sub.add_parser(
        "downstream", help="the paper's protocol: train a task network on each method's fused images, score it"
    )
    p.add_argument("--dataset", required=True, choices=("msrs", "fmb", "m3fd", "llvip"))
    p.add_argument("--root", required=True, help="the data set's folder as downloaded (labels come from here)")
    p.add_argument("--split-dir", help="folder with train.txt / test.txt name lists (M3FD)")
    p.add_argument("--task-net", choices=sorted(TASK_KINDS), default="segformer")
    p.add_argument(
        "--method",
        action="append",
        required=True,
        metavar="NAME:TRAIN_DIR:TEST_DIR",
        help="a method's fused training and test folders (repeat for each method)",
    )
    p.add_argument("--epochs", type=at_least(1), default=300, help="task-network epochs per method (paper: 300)")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate of the task network")
    p.add_argument(
        "--task-size", type=at_least(8), nargs=2, metavar=("H", "W"), help="task input size (default: per data set)"
    )
    _device_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=downstream)
    p = sub.add_parser("check-data", help="validate a data set folder before a long run; exit 1 naming each bad file")
    p.add_argument("--dataset", required=True, choices=("msrs", "fmb", "m3fd", "llvip", "folders"))
    p.add_argument("--root", help="the data set's folder as downloaded")
    p.add_argument("--a", help="--dataset folders: first source folder")
    p.add_argument("--b", help="--dataset folders: second source folder")
    p.add_argument("--split-dir", help="read train.txt / test.txt from here (M3FD)")
    p.add_argument("--write-splits", help="write the generated splits (M3FD, LLVIP) as name lists here")
    p.add_argument(
        "--task-net",
        choices=sorted(TASK_KINDS),
        help="check the labels this task network needs (segformer/unet: label maps; yolov8: boxes); "
        "default: the data set's default task (segmentation where it has it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", help="unused; accepted for symmetry with the other commands")
    p.set_defaults(func=check_data)
    for command in sub.choices.values():  # --help shows the defaults that apply to each command
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]  # no subcommand: the demo, with any options given
    if argv[0] == "train" and not {"-h", "--help"} & set(argv):
        argv = ["train", *expand_config(SUBPARSERS["train"], argv[1:])]
    args = parser.parse_args(argv)
    check_paths(parser, args)  # before any work or any file written
    if getattr(args, "quiet", False):
        os.environ["YOLO_VERBOSE"] = "False"  # ultralytics reads it when first imported (lazily, later)
    result = args.func(args)
    if isinstance(result, Path):
        print(result.resolve())


if __name__ == "__main__":
    main()
