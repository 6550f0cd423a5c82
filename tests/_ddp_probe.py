"""``effvit ARGS`` under torchrun, with a probe in each rank that writes into the run folder the sample
indices the rank drew each epoch (samples_rank{R}.txt: 'EPOCH I J ...' per line) and its final weights and
buffers (weights_rank{R}.pth), so a test can check that DDP shards the data and keeps the ranks identical.

    python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_probe.py train ...
"""

import os
import sys

from effvit.cli import main
from effvit.train import engine, samplers
from effvit.train.checkpoint import cpu_state, save_atomic

RANK = int(os.environ["RANK"])
drawn: list[tuple[int, list[int]]] = []
sampler_iter, engine_train = samplers.EpochSampler.__iter__, engine.train


def recording_iter(self):
    indices = list(sampler_iter(self))
    drawn.append((self.epoch, indices))
    return iter(indices)


def train_and_record(task, cfg, **kwargs):
    result = engine_train(task, cfg, **kwargs)
    lines = "".join(f"{epoch} {' '.join(map(str, indices))}\n" for epoch, indices in drawn)
    (result.output_dir / f"samples_rank{RANK}.txt").write_text(lines)
    save_atomic(cpu_state(task.model), result.output_dir / f"weights_rank{RANK}.pth")
    return result


samplers.EpochSampler.__iter__ = recording_iter
engine.train = train_and_record
sys.exit(main(sys.argv[1:]))
