"""Run by test_pruning_multiprocess.py under `accelerate launch --cpu --num_processes 2`: train with a PruningCallback
and write each rank's masks and a digest of its scores to OUT/rank-<r>.safetensors."""

import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 2)[0])
from helpers import leave_process_group
from test_callback import schedule, task, tiny_classifier

from hfcompress import MovementPruningConfig, PruningCallback
from hfcompress.pruning import Pruner


def main(out: str) -> None:
    model = tiny_classifier()
    args = TrainingArguments(
        output_dir=out, max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=4,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=task(), callbacks=[PruningCallback(MovementPruningConfig(**schedule()))]
    )
    trainer.train()
    pruner = Pruner.from_model(model)
    tensors = {}
    for name, (_, mask) in pruner.masks.items():
        tensors[f"{name}.mask"] = mask.mask.contiguous()
        tensors[f"{name}.scores"] = mask.scores.detach().contiguous()
    rank = trainer.args.process_index
    tensors["world_size"] = torch.tensor([trainer.args.world_size])
    tensors["gloo"] = torch.tensor([torch.distributed.get_backend() == "gloo"])
    save_file(tensors, f"{out}/rank-{rank}.safetensors")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
