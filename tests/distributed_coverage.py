"""Run under `accelerate launch` by test_distributed.py: records which images each rank sees per epoch."""

import json
import sys

import torch

from ldmflow.training.loop import _prepare, build_accelerator
from ldmflow.training.settings import PixelDdpmSettings


class IndexData(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return {"index": index}


class Task:
    metric_names = ()

    def setup(self, accelerator):
        return torch.nn.Linear(1, 1), IndexData()

    def after_prepare(self, accelerator, model):
        pass


class Quiet:
    run_id = ""


settings = PixelDdpmSettings(manifest_path="unused", output_dir=sys.argv[1], resolution=32, train_batch_size=2,
                             block_out_channels=(32, 32), num_epochs=2, no_mlflow=True)
accelerator = build_accelerator(settings)
run = _prepare(settings, Task(), accelerator)
seen = []
for epoch in range(2):
    run.dataloader.set_epoch(epoch)
    seen.append([int(i) for batch in run.dataloader for i in batch["index"]])
with open(f"{sys.argv[1]}/seen_{accelerator.process_index}.json", "w") as handle:
    json.dump({"seen": seen, "steps_per_epoch": run.steps_per_epoch, "max_steps": run.max_steps}, handle)
