"""Run `hf_hydra.training.trainer.train` from JSON arguments; launched by `accelerate launch` in the tests."""

from __future__ import annotations

import json
import sys

import torch

from hf_hydra.training.trainer import TrainingArguments, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    train(TrainingArguments(**json.loads(sys.argv[1])))
