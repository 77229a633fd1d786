"""NVIDIA DALI: an ``external_source`` of the table's JPEG bytes -> ``fn.decoders.image``
(mixed on a GPU, CPU otherwise) -> random resized crop -> crop-mirror-normalize."""

from __future__ import annotations

import numpy as np

from ..harness import torch_sync


def e2e_loader(a: dict, workers: int):
    """The same augmentation as gpuload's end-to-end rows, in a DALI pipeline."""
    import torch

    bs = a["batch_size"]
    device = a.get("device", "cpu")
    image, label = a.get("image", "image"), a.get("label")
    cols = [image] + ([label] if label else [])
    from nvidia.dali import fn, pipeline_def, types

    import gpuload

    t = gpuload.open_table(a["url"])
    dali_cuda = str(device).startswith("cuda")

    def source():
        e = 0
        while True:
            for b in t.batches(bs, shuffle=True, seed=0, epoch=e, columns=cols, drop_last=True):
                jpegs = [np.frombuffer(x, np.uint8) for x in b[image]]
                labels = (
                    [np.asarray(v, np.int64) for v in b[label]]
                    if label
                    else [np.zeros((), np.int64)] * len(jpegs)
                )
                yield jpegs, labels
            e += 1

    src = source()

    @pipeline_def(
        batch_size=bs,
        num_threads=workers,
        device_id=0 if dali_cuda else None,
        seed=0,
        prefetch_queue_depth=2,
    )
    def pipe():
        jpegs, labels = fn.external_source(
            source=src, num_outputs=2, dtype=[types.UINT8, types.INT64]
        )
        img = fn.decoders.image(
            jpegs, device="mixed" if dali_cuda else "cpu", output_type=types.RGB
        )
        img = fn.random_resized_crop(
            img, size=(224, 224), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
        )
        img = fn.crop_mirror_normalize(
            img,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in (0.485, 0.456, 0.406)],
            std=[s * 255 for s in (0.229, 0.224, 0.225)],
            mirror=fn.random.coin_flip(probability=0.5),
        )
        return img, labels

    p = pipe()
    p.build()

    def epoch(e):
        for _ in range(max(1, len(t) // bs)):
            imgs, labels = p.run()
            x = imgs.as_tensor()
            yield {
                "image": torch.from_dlpack(x),
                "label": torch.from_dlpack(labels.as_tensor()),
            }

    return epoch, torch_sync(device), None
