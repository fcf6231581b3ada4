"""Two processes read a webdataset source through the training loader, stop mid-epoch and resume
(a helper of ``tests/test_data_sources.py``).

    accelerate launch --multi_gpu --num_processes 2 tests/stream_check.py SHARDS OUT_DIR RESUME_STEP STEPS

Each process builds the dataset (the first to arrive indexes the shards, the other waits for the
index), reads RESUME_STEP batches with :func:`common.training.make_loader` (two loader workers),
drops the loader as a stopped run does, and builds a new one at RESUME_STEP as a resumed run does,
reading up to STEPS. It writes the captions it saw, in order, to ``OUT_DIR/rank<r>.json``.
"""
from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run by hand

from accelerate import Accelerator  # noqa: E402

from common.data import DataConfig, build_dataset  # noqa: E402
from common.training import RunConfig, make_loader  # noqa: E402

RUN = RunConfig(batch_size=3, num_workers=2, seed=5)


def captions(loader, batches: int) -> list[str]:
    return [caption for batch in islice(loader, batches) for caption in batch["caption"]]


def main(shards: str, out_dir: str, resume_step: int, steps: int) -> None:
    accelerator = Accelerator(cpu=True)
    dataset = build_dataset(DataConfig(name="webdataset", path=shards, resolution=8))
    seen = captions(make_loader(dataset, RUN, accelerator, step=0), resume_step)
    # the position a checkpoint holds is the step; the loader is rebuilt from it
    seen += captions(make_loader(dataset, RUN, accelerator, step=resume_step), steps - resume_step)
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"world": accelerator.num_processes, "captions": seen}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
