"""arcface_torch's training input pipeline, with the real torchvision, as a baseline for `loader_throughput.py`.

MXFaceDataset's per-sample work (`recognition/arcface_torch/dataset.py`): decode the record's image to
an RGB array, then `Compose([ToPILImage(), RandomHorizontalFlip(), ToTensor(), Normalize(0.5, 0.5)])`,
and a DataLoader's default collation. Decoding is PIL here (arcface_torch uses mx.image.imdecode,
OpenCV), the records are in-memory bytes. Needs only torch, torchvision, PIL and numpy, so that it can
run from another environment (torchvision may not import beside femb's torch):

    python benchmarks/torchvision_pipeline.py DATA_DIR BATCH_SIZE   # then one line "run" per timed epoch

DATA_DIR holds `images.bin` (concatenated encoded images), `lengths.npy` and `labels.npy`. Each "run"
on stdin answers one JSON line: {"images", "wall_s", "cpu_s"} of one epoch.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class InMemoryFaces(Dataset):
    """MXFaceDataset's __getitem__ on in-memory records: decoded RGB array -> transform, label as a long tensor."""

    def __init__(self, images: list[bytes], labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels
        self.transform = transforms.Compose(
            [
                transforms.ToPILImage(),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = np.array(Image.open(io.BytesIO(self.images[index])).convert("RGB"))
        label = torch.tensor(int(self.labels[index]), dtype=torch.long)
        return self.transform(sample), label


def read_data(data_dir: Path) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and labels that `loader_throughput.write_data` wrote to `data_dir`."""
    blob = (data_dir / "images.bin").read_bytes()
    ends = np.cumsum(np.load(data_dir / "lengths.npy")).tolist()
    images = [blob[start:end] for start, end in zip([0, *ends[:-1]], ends)]
    return images, np.load(data_dir / "labels.npy")


def make_loader(images: list[bytes], labels: np.ndarray, batch_size: int) -> DataLoader:
    """One process, shuffled, whole batches: arcface_torch's loader with num_workers=0."""
    return DataLoader(InMemoryFaces(images, labels), batch_size=batch_size, shuffle=True, drop_last=True)


def epoch(loader: DataLoader) -> dict[str, float]:
    """Time one epoch on the wall and on this process's CPU clock."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = sum(batch.shape[0] for batch, _labels in loader)
    return {"images": count, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main() -> None:
    torch.set_num_threads(1)
    data_dir, batch_size = Path(sys.argv[1]), int(sys.argv[2])
    loader = make_loader(*read_data(data_dir), batch_size)
    epoch(loader)  # warm-up
    print(
        json.dumps({"ready": True, "torchvision": torchvision.__version__, "torch": torch.__version__}),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(epoch(loader)), flush=True)


if __name__ == "__main__":
    main()
