"""Throughput of ``cnnbal.extract.extract`` against a plain torch loop (CPU).

Generates a few thousand random RGB PNGs in a temporary class folder, builds a
small ResNet-style CNN, and times, over the same images and batch size:

    decode+preprocess   Pillow decode -> uint8 stack -> normalise, no model
    forward             the model + softmax over already preprocessed batches
    plain loop          decode+preprocess then forward, batch by batch, one process
    extract (wN)        the cnnbal API end to end (N data loader workers),
                        including the parquet output

and reports the overhead of extract against the sum of the first two:
``time(extract) / (time(decode+preprocess) + time(forward)) - 1``. The target is
at most 25% at batch size 64. Medians over ``--repeats`` runs.

    python benchmarks/bench_extract.py              # 3072 images of 64x64, 3 repeats
    python benchmarks/bench_extract.py --quick      # 640 images of 64x64, 1 repeat
    python benchmarks/bench_extract.py --threads 1  # steadier on a busy machine

Also printed: the best run of each (the least disturbed on a shared machine)
and the CPU seconds of this process plus its finished workers.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cnnbal import extract as api


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(n_classes: int = 10, width: int = 16) -> nn.Module:
    """A ResNet-ish CNN: stem, three stages of two basic blocks, global pool, linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, width, 2),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 2 * width, 1),
        BasicBlock(2 * width, 4 * width, 2),
        BasicBlock(4 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, n_classes),
    ).eval()


def write_images(root: Path, n_images: int, size: int, n_classes: int) -> list[Path]:
    """Smooth random images (compress like photos, unlike white noise), one folder per class."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n_images):
        coarse = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        path = root / f"class{index % n_classes:02d}" / f"img{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return sorted(paths)


def batches_of(items, batch_size):
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def decode(paths, batch_size, prep):
    """The preprocessed (B, C, H, W) batches, decoded one image at a time."""
    return [
        api.preprocess(np.stack([api.load_image(path, prep) for path in batch]), prep)
        for batch in batches_of(paths, batch_size)
    ]


def forward(model, inputs):
    with torch.inference_mode():
        for batch in inputs:
            torch.softmax(model(batch).float(), dim=1).numpy()


def plain_loop(model, paths, batch_size, prep):
    with torch.inference_mode():
        for batch in batches_of(paths, batch_size):
            inputs = api.preprocess(np.stack([api.load_image(path, prep) for path in batch]), prep)
            torch.softmax(model(inputs).float(), dim=1).numpy()


def measure(run) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process and its finished workers) of ``run()``."""

    def cpu_seconds():
        own, workers = (
            resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="640 images, 1 repeat")
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice). On a shared machine 1 is far "
        "steadier: with 2 threads a barrier waits on whichever thread lost its core.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.repeats = 640, 1

    model = small_resnet()
    prep = api.Preprocessing()
    print(
        f"{args.images} PNGs of {args.size}x{args.size} RGB, batch size {args.batch_size}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"median of {args.repeats} repeat(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        paths = write_images(root, args.images, args.size, n_classes=10)
        source = api.discover(root)
        out = Path(tmp) / "out.parquet"
        inputs = decode(paths, args.batch_size, prep)
        forward(model, inputs[:4])  # warm up the kernels

        variants = {
            "decode+preprocess": lambda: decode(paths, args.batch_size, prep),
            "forward": lambda: forward(model, inputs),
            "plain loop": lambda: plain_loop(model, paths, args.batch_size, prep),
        }
        for workers in args.workers:
            variants[f"extract (workers={workers})"] = functools.partial(
                api.extract, model, source, out, preprocessing=prep, device="cpu",
                batch_size=args.batch_size, workers=workers,
            )  # fmt: skip
        # Repeats interleave all variants (in a rotating order) so that load from other
        # processes hits them alike; overheads are paired ratios within each repeat.
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                timings[name].append(measure(variants[name]))

    report(timings, args.images)


def report(timings: dict[str, list[tuple[float, float]]], n_images: int) -> None:
    """Print median (and best) throughputs, and overheads against decode+forward.

    The machine may be shared: the medians carry the noise, the best runs (the
    least disturbed) show what the code costs.
    """
    decode_forward = [
        (decode[0] + forward[0], decode[1] + forward[1])
        for decode, forward in zip(timings["decode+preprocess"], timings["forward"], strict=True)
    ]
    best_baseline = min(run[0] for run in timings["decode+preprocess"]) + min(
        run[0] for run in timings["forward"]
    )
    print(
        f"{'':24} {'median s':>8} {'images/s':>9} {'overhead':>9}   "
        f"{'best s':>7} {'images/s':>9} {'overhead':>9}   {'CPU s':>6}"
    )
    overheads = {}
    for name, runs in timings.items():
        median = statistics.median(run[0] for run in runs)
        best = min(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        median_ratio = best_ratio = ""
        if name not in ("decode+preprocess", "forward"):
            # paired: each run against decode+forward of the same repeat
            paired = zip(runs, decode_forward, strict=True)
            median_overhead = statistics.median(run[0] / base[0] - 1 for run, base in paired)
            overheads[name] = best / best_baseline - 1
            median_ratio, best_ratio = f"{median_overhead:+.1%}", f"{overheads[name]:+.1%}"
        print(
            f"{name:24} {median:8.3f} {n_images / median:9.0f} {median_ratio:>9}   "
            f"{best:7.3f} {n_images / best:9.0f} {best_ratio:>9}   {cpu:6.2f}"
        )
    name, overhead = min(
        ((n, o) for n, o in overheads.items() if n.startswith("extract")), key=lambda item: item[1]
    )
    verdict = "within" if overhead <= 0.25 else "OVER"
    print(
        "overhead = time / (decode+preprocess time + forward time) - 1; median: paired per "
        "repeat, best: best run against the best runs.\n"
        f"best: {name}, overhead {overhead:+.1%} ({verdict} the 25% target)"
    )


if __name__ == "__main__":
    main()
