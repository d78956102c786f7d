"""metaloss: learn a loss function by meta-learning, inside your own training loop.

The core is task-agnostic: a ``LearnableLoss`` (a generator of per-pixel source weights and
weighted terms), a stateless differentiable inner step, exact (by double backward or a
forward-mode product) and finite-difference hypergradients, an embeddable ``MetaStep``, and
``MetaTrainer``, which runs the schedule of TDFusion's Algorithm 1 (Bai et al., CVPR 2025).
"""

from metaloss.activation_checkpointing import checkpointed_call, internal_checkpointing
from metaloss.batch import BatchAdapter, SourcesAdapter, move_to_device
from metaloss.callbacks import Callback, CSVLogger, TensorBoardLogger
from metaloss.checkpoint import UnsafeCheckpointError, load_checkpoint, load_weights_file, save_checkpoint
from metaloss.hypergradient import HypergradientResult, NonFiniteHypergradientError, hypergradient, hypergradient_jvp
from metaloss.inner_step import BufferPolicy, InnerAdam, InnerRule, InnerSGD, StatelessModule
from metaloss.learnable_loss import ConstantWeights, GlobalWeights, LearnableLoss, LossOutput, LossTerm
from metaloss.map_gradient import remove_component, shift_direction
from metaloss.meta_step import MetaStep, MetaStepStats, SecondOrder, TaskLoss, VirtualStep
from metaloss.outer import MaxNormalizedSGD, make_outer_optimizer
from metaloss.trainer import MetaTrainer, MetaTrainerConfig, ModelStepStats, Position

__version__ = "0.1.0"

__all__ = [
    "BatchAdapter",
    "BufferPolicy",
    "CSVLogger",
    "Callback",
    "ConstantWeights",
    "GlobalWeights",
    "HypergradientResult",
    "InnerAdam",
    "InnerRule",
    "InnerSGD",
    "LearnableLoss",
    "LossOutput",
    "LossTerm",
    "MaxNormalizedSGD",
    "MetaStep",
    "MetaStepStats",
    "MetaTrainer",
    "MetaTrainerConfig",
    "ModelStepStats",
    "NonFiniteHypergradientError",
    "Position",
    "SourcesAdapter",
    "SecondOrder",
    "StatelessModule",
    "TaskLoss",
    "TensorBoardLogger",
    "UnsafeCheckpointError",
    "VirtualStep",
    "checkpointed_call",
    "hypergradient",
    "hypergradient_jvp",
    "internal_checkpointing",
    "load_checkpoint",
    "load_weights_file",
    "make_outer_optimizer",
    "move_to_device",
    "remove_component",
    "save_checkpoint",
    "shift_direction",
]
