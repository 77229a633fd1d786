"""One torchrun rank: the loader shards itself from the initialised gloo process group.
Every batch does an all_reduce, so unequal batch counts across ranks would hang (and the
parent's timeout would fail the test)."""

import json
import os
import sys

import torch
import torch.distributed as dist

import gpuload


def main() -> None:
    table, outdir, uneven = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = gpuload.pytorch(
        table, batch_size=8, shuffle=True, seed=11, columns=["text", "label"], uneven=uneven
    )
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        texts, nb = [], 0
        for b in loader:
            texts += b["text"]
            nb += 1
            x = torch.tensor([float(len(b["label"]))])
            dist.all_reduce(x)  # a rank with fewer batches would leave the others waiting here
        epochs.append({"texts": texts, "batches": nb})
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "epochs": epochs}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
