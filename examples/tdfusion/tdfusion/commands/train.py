"""``run.py train``: Algorithm 1 on a data set, resumable, configurable by YAML; under ``torchrun``
every rank trains its shard with F and T in DistributedDataParallel."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from metaloss import CSVLogger, InnerSGD, MetaTrainer, MetaTrainerConfig, SourcesAdapter
from metaloss.checkpoint import save_safetensors
from metaloss.distributed import rank_and_world_size, unwrap
from metaloss.fusion import LossGenerator, ReFusion

from ..catalog import DATASETS, load_scenes
from ..data import FusionDataset, collate, collate_swapped
from ..networks import UnetLossGenerator, build_fusion_network, build_loss
from ..options import add_training_options
from ..run_config import write_config
from ..tasks import TASK_KINDS, StandardizedInput, build_task, median_frequency_weights
from .check_data import check_training_data

__all__ = ["add_parser", "build_trainer", "config_parser", "train"]


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


def _check_class_weight_options(args: argparse.Namespace, kind: str) -> None:
    """Class weights come from segmentation labels, and --class-weight-power only shapes them."""
    balanced = [name for name in ("balanced_task_loss", "balanced_map_gradient") if getattr(args, name)]
    if balanced and kind != "seg":
        options = " and ".join("--" + name.replace("_", "-") for name in balanced)
        raise SystemExit(f"{options} weigh segmentation classes; --task-net {args.task_net} is a detector")
    if args.class_weight_power != 1.0 and not balanced:
        raise SystemExit(
            "--class-weight-power shapes the class weights of --balanced-task-loss or --balanced-map-gradient; "
            "give one of them"
        )


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
    _check_class_weight_options(args, kind)
    task = build_task(args.task_net, spec[kind])
    task_size = tuple(args.task_size) if args.task_size else spec["task_size"]
    if args.dataset != "synthetic":  # a bad label must not surface as a traceback mid-training
        check_training_data(args, "seg" if kind == "seg" else "det")
    scenes = load_scenes(args, "train", kind)
    class_weights = None
    if args.balanced_task_loss or args.balanced_map_gradient:
        class_weights = median_frequency_weights([s.label_mask() for s in scenes], spec[kind], args.class_weight_power)
    if class_weights is not None and args.balanced_task_loss:
        task.loss.class_weights = class_weights
    if args.standardize_task_input:
        task.model = StandardizedInput(task.model)
    dataset = FusionDataset(scenes, kind, crop=args.crop, task_size=task_size, flip=args.flip)
    model = _ddp(build_fusion_network(args.ablation).to(device), device)
    loss = build_loss(args).to(device)
    for network in (*model.modules(), *loss.modules()):
        if isinstance(network, ReFusion | LossGenerator | UnetLossGenerator):
            network.checkpoint_blocks = args.checkpoint_blocks
    if args.compile_generator:
        loss.generator.compile()
    task_model = _ddp(task.model.to(device), device)
    config = MetaTrainerConfig(
        epochs=args.epochs,
        meta_iterations=args.meta_iterations,
        meta_accumulation=args.meta_accumulation,
        warmup_epochs=args.warmup_epochs,
        frozen_loss_epochs=args.frozen_loss_epochs,
        map_gradient=args.map_gradient,
        task_adaptation=args.task_adaptation,
        inner_steps=args.inner_steps,
        meta_test=args.meta_test,
        virtual_step=args.virtual_step,
        output_lr=args.output_lr,
        model_iterations=args.model_iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        outer_rule=args.outer,
        outer_lr=args.outer_lr,
        mode=args.mode,
        second_order=args.second_order,
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
        task_inner=InnerSGD(args.task_inner_lr if args.task_inner_lr is not None else args.inner_lr),
        callbacks=[CSVLogger(out / "logs"), *(callbacks or [])],
        checkpoint_dir=out,
    )
    if class_weights is not None and args.balanced_map_gradient:
        # The map is the crop's, or the task view's where the virtual step moves F's output.
        labels = "mask" if args.virtual_step == "output" else "crop_mask"
        weights = torch.cat([class_weights, torch.zeros(1)]).to(device)  # the last: labels outside the classes
        outside = len(class_weights)

        def pixel_weights(batch: Any) -> torch.Tensor:
            mask = batch[labels]
            inside = (mask >= 0) & (mask < outside)  # 255 ("unlabelled") or a negative ignore index weigh 0
            return weights[torch.where(inside, mask, outside)].unsqueeze(1)

        trainer.meta_step.map_gradient_weights = pixel_weights
    return trainer


def train(args: argparse.Namespace, callbacks: list[Any] | None = None) -> MetaTrainer:
    """Train F, G and T with Algorithm 1; returns the trainer (its checkpoint is in --out).

    Under ``torchrun --nproc-per-node N`` every rank trains on its shard, F and T wrapped in
    DistributedDataParallel; rank 0 writes the checkpoints, logs and config.
    """
    trainer = build_trainer(args, callbacks)
    out = Path(args.out)
    if trainer.rank == 0:  # train --config OUT/config.yaml --out NEW repeats this run
        write_config(out / "config.yaml", args, config_parser())
    resume = getattr(args, "resume", None)  # the demo has no --resume
    if trainer.rank == 0 and trainer.meta_step.compiles_product and args.meta_iterations > 0 and not args.quiet:
        print("--second-order compiled_jvp: the first meta step compiles F's forward-mode product (torch.compile)")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s options: the training options, ``--resume``, ``--out``, ``--config`` and overrides."""
    add_training_options(p)
    p.add_argument("--resume", help="continue from a checkpoint (last.pt)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="settings from a YAML file (configs/, or a run's config.yaml); flags given here win over it",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings applied last (epochs=10 lr=2e-4)")


def config_parser() -> argparse.ArgumentParser:
    """A parser of ``train``'s options alone: what a configuration file may hold (``run_config``)."""
    p = argparse.ArgumentParser(prog="run.py train")
    add_arguments(p)
    return p


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "train", help="train TDFusion (resumable); writes last.pt, fusion.safetensors, config.yaml, logs/"
    )
    add_arguments(p)
    p.set_defaults(func=train)
    return p
