"""Run under `accelerate launch` by test_distributed.py: records which images each rank sees per epoch."""

import json
import sys

import torch

from ldmflow.settings import LegacyDdpmSettings
from ldmflow.training.prepare import _prepare, build_accelerator
from ldmflow.training.task import Task


class IndexData(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return {"index": index}


class IndexTask(Task):
    def setup(self, accelerator):
        return torch.nn.Linear(1, 1), IndexData()


class Quiet:
    run_id = ""


settings = LegacyDdpmSettings(manifest_path="unused", output_dir=sys.argv[1], resolution=32, train_batch_size=2,
                             block_out_channels=(32, 32), num_epochs=2, no_mlflow=True)
accelerator = build_accelerator(settings)
run = _prepare(settings, IndexTask(), accelerator)
seen = []
for epoch in range(2):
    run.dataloader.set_epoch(epoch)
    seen.append([int(i) for batch in run.dataloader for i in batch["index"]])
with open(f"{sys.argv[1]}/seen_{accelerator.process_index}.json", "w") as handle:
    json.dump({"seen": seen, "steps_per_epoch": run.steps_per_epoch, "max_steps": run.max_steps}, handle)
