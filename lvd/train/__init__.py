"""Training infrastructure shared by both stages (see recipes/ for the runnable scripts).

- :mod:`lvd.train.loop`: :class:`Trainer` (grad accumulation, clipping, EMA, bf16 on CUDA, NaN guard,
  GAN aux step, metrics.jsonl / tensorboard / tqdm, exact resume) and its config dataclasses.
- :mod:`lvd.train.checkpoint`: atomic safetensors + JSON resume checkpoints (no pickle).
- :mod:`lvd.train.distributed`: torchrun detection, DDP / FSDP2 applied from outside the model.
- :mod:`lvd.train.stages`: the end-to-end recipes' stages: skipped when done, timed, commands logged.
"""

from lvd.train.checkpoint import CheckpointConfig, CheckpointError, latest_checkpoint
from lvd.train.distributed import DistEnv, DistributedConfig, DistributedError, init_distributed, wrap_model
from lvd.train.loop import (
    EMA,
    Aux,
    Hook,
    NonFiniteLossError,
    OptimConfig,
    RunConfig,
    StepOutput,
    TrainConfig,
    Trainer,
    export_pretrained,
    prepare_model,
)

__all__ = [
    "Aux", "CheckpointConfig", "CheckpointError", "DistEnv", "DistributedConfig", "DistributedError", "EMA", "Hook",
    "NonFiniteLossError", "OptimConfig", "RunConfig", "StepOutput", "TrainConfig", "Trainer", "export_pretrained",
    "init_distributed", "latest_checkpoint", "prepare_model", "wrap_model",
]
