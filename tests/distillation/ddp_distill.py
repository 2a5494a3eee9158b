"""Run by test_distillation_multiprocess.py under `accelerate launch` with two CPU processes: distill and write each rank's
student weights to OUT/rank-<r>.safetensors."""

import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 2)[0])
from helpers import leave_process_group
from test_distillation import args, classifier, task

from hfcompress import DistillationConfig, DistillationTrainer


def main(out: str) -> None:
    teacher = classifier(layers=4, hidden=32, seed=1)
    student = classifier(layers=2, hidden=16, seed=3)  # narrower: a projection trains too
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=DistillationConfig(hidden_states=[(4, 2)]),
        args=args(out, steps=6, per_device_train_batch_size=4), train_dataset=task(),
    )  # fmt: skip
    trainer.train()
    tensors = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    tensors.update({f"projection.{k}": v.detach().contiguous() for k, v in trainer.projections.state_dict().items()})
    tensors["world_size"] = torch.tensor([trainer.args.world_size])
    save_file(tensors, f"{out}/rank-{trainer.args.process_index}.safetensors")
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
