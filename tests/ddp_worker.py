"""Run by tests/test_trainer.py under torchrun: trains the toy model under each given mode (ddp, fsdp), resumes a
copy of its step-4 checkpoint (and DDP's under FSDP), and writes each rank's gathered parameters and summary to
<output_dir>."""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from e2evlp.train import Trainer, TrainerConfig, barrier, init_distributed, is_main_process, rank, step_dir, world_size
from tests.trainer_helpers import ToyModel, toy_loader


def gathered_params(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter in full (FSDP2 shards are gathered; every rank must call it)."""
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1).cpu() for p in full])


def train(output_dir: Path, mode: str, model_seed: int) -> tuple[torch.Tensor, dict, int]:
    """Returns the trained parameters, the summary and how many modules FSDP2 made units of."""
    torch.manual_seed(model_seed)
    config = TrainerConfig(output_dir=str(output_dir), max_steps=6, lr=1e-2, warmup_steps=2, grad_accum_steps=2,
                           distributed=mode, save_every=2, keep_last=0, log_every=1, progress=False)
    trainer = Trainer(ToyModel(attention_layers=2), config,
                      toy_loader(batch_size=4, num_replicas=world_size(), rank=rank()))
    summary = trainer.train()
    return gathered_params(trainer.model), summary, sum(isinstance(m, FSDPModule) for m in trainer.model.modules())


def main(output_dir: Path, modes: list[str]) -> None:
    init_distributed()
    for mode in modes:
        full, summary, fsdp_units = train(output_dir / mode / "full", mode, model_seed=0)
        if is_main_process():
            shutil.copytree(step_dir(output_dir / mode / "full", 4), step_dir(output_dir / mode / "resumed", 4))
        barrier()
        resumed, _, _ = train(output_dir / mode / "resumed", mode, model_seed=1)
        torch.save({"full": full, "resumed": resumed, "summary": summary, "fsdp_units": fsdp_units},
                   output_dir / f"{mode}-rank{rank()}.pt")
    if {"ddp", "fsdp"} <= set(modes):  # DDP's step-4 checkpoint, resumed under FSDP
        if is_main_process():
            shutil.copytree(step_dir(output_dir / "ddp" / "full", 4), step_dir(output_dir / "ddp-to-fsdp", 4))
        barrier()
        crossed, _, _ = train(output_dir / "ddp-to-fsdp", "fsdp", model_seed=1)
        torch.save({"resumed": crossed}, output_dir / f"ddp-to-fsdp-rank{rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
