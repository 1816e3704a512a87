"""What only a CUDA GPU can prove about ``cnnbal extract`` (issue 11), in under a minute.

    python benchmarks/gpu_check.py            # on a machine with one CUDA GPU

Checks, each printed as PASS/FAIL with its figures:

1. CPU vs CUDA probabilities on the same images and model: float32 (TF32 off,
   extract's default) within 2e-5; ``--tf32`` (printed; within 5e-3); ``--amp
   bf16`` and ``--amp fp16`` (printed; within 5e-2 and 1e-2).
2. fp16 overflow: a model whose logits pass 65504 is refused under ``--amp
   fp16`` (exit 2, the first bad image named, ``--amp bf16`` suggested) and
   runs in float32 and bf16.
3. Out of memory: a forward pass that asks for a petabyte gives torch's real
   ``OutOfMemoryError``; the command prints one line with the ``--batch-size``
   hint and exits 2.
4. The grayscale-array case: a float (N, 1, H, W) array with ``--channels 3``
   and no resize, batches pinned by the data loader, equals the CPU result.
5. The caller's CPU model comes back on the CPU; a TorchScript archive with a
   plain tensor attribute, loaded onto the GPU by ``load_model``, runs there.
6. Throughput: extract on a uint8 array against a bare torch loop (pinned
   host batches, normalise on the GPU, forward, softmax, copy back) over the
   same images; the ratio is printed (the bare loop writes no file).

Exit status: 0 when every check passed, 1 when one failed. Without a CUDA
device it computes the CPU references, says that the CUDA checks did not
run, and exits 0. ``--device cpu`` runs every check on the CPU instead: a
dry run of this script's own logic (fp16, the out-of-memory error and the
throughput figure then mean little; the two fp16 checks fail).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnbal import extract as api
from cnnbal.errors import CnnbalError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this module's factories, by name
RESULTS: list[tuple[str, bool, str]] = []
DEVICE = "cuda"  # --device cpu: a dry run of the checks' own logic


class SmallResNet(nn.Module):
    """A conv net wide enough for cuDNN's TF32 to show; logits scaled so softmax is not flat."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        layers, channels = [], in_channels
        for out_channels, stride in [(width, 1), (width, 2), (2 * width, 2), (2 * width, 1)]:
            layers += [
                nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)) * 5.0


class Brightness(nn.Module):
    """Logits proportional to mean brightness: a bright image's logits pass 65504 in fp16."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4e4], [3e4], [1e4]]))
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(images.mean(dim=(1, 2, 3)))[:, None])


class PetabyteForward(SmallResNet):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch.empty(2**50, dtype=torch.uint8, device=images.device)  # 1 PiB: out of memory
        return super().forward(images)


class WithTensorAttribute(nn.Module):
    """A plain tensor attribute (not a parameter or buffer): Module.to() does not move it."""

    def __init__(self):
        super().__init__()
        self.net = SmallResNet(width=8)
        self.offset = torch.arange(10, dtype=torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) + self.offset


def make_overflow_model() -> nn.Module:
    return Brightness().eval()


def make_petabyte_model() -> nn.Module:
    return PetabyteForward().eval()


def check(name: str, passed: bool, detail: str) -> None:
    RESULTS.append((name, passed, detail))
    print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)


def probs_of(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    column = pq.read_table(path).column("probs").combine_chunks()
    return column.flatten().to_numpy().reshape(-1, column.type.list_size)


def run_cli(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cnnbal.cli import app

    result = CliRunner().invoke(app, ["extract", *map(str, args)])
    return result.exit_code, result.stderr.strip()


def main() -> int:
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # the numeric checks: 512 RGB images of 32 x 32 and a gray float array
        rgb = tmp / "rgb.npz"
        np.savez(rgb, images=rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8))
        gray = tmp / "gray.npy"
        np.save(gray, rng.random((256, 1, 32, 32), dtype=np.float32))
        model = SmallResNet()
        api.extract(model, api.discover(rgb), tmp / "cpu.parquet", device="cpu")
        api.extract(model, api.discover(gray), tmp / "gray_cpu.parquet", device="cpu")
        print(
            f"CPU references: {rgb.name} (512 x 32 x 32 x 3 uint8), {gray.name} "
            f"(256 x 1 x 32 x 32 float32), torch {torch.__version__}, "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        if DEVICE == "cpu":
            print("dry run on the CPU: the fp16 checks are expected to fail")
        elif not torch.cuda.is_available():
            print("no CUDA device: the CUDA checks did not run (run this on a GPU machine)")
            return 0
        else:
            name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
            print(f"CUDA: {name}, compute capability {capability[0]}.{capability[1]}")
        cpu_probs = probs_of(tmp / "cpu.parquet")
        numerics(model, rgb, tmp, cpu_probs)
        overflow_and_oom(tmp)
        gray_array(gray, tmp)
        placement(model, rgb, tmp)
        throughput(tmp)
    failed = [name for name, passed, _ in RESULTS if not passed]
    print(
        f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in "
        f"{time.perf_counter() - started:.1f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def numerics(model, rgb: Path, tmp: Path, cpu_probs: np.ndarray) -> None:
    cases = [
        ("float32 (TF32 off, default)", {}, 2e-5),
        ("TF32 (--tf32)", {"tf32": True}, 5e-3),
        ("bf16 (--amp bf16)", {"amp": "bf16"}, 5e-2),
        ("fp16 (--amp fp16)", {"amp": "fp16"}, 1e-2),
    ]
    for name, options, tolerance in cases:
        out = tmp / "cuda.parquet"
        try:
            report = api.extract(model, api.discover(rgb), out, device=DEVICE, **options)
        except CnnbalError as error:
            check(f"CPU vs CUDA, {name}", False, f"refused: {error}")
            continue
        diff = float(np.abs(probs_of(out) - cpu_probs).max())
        check(
            f"CPU vs CUDA, {name}",
            diff <= tolerance,
            f"max |p_cuda - p_cpu| = {diff:.2e} (limit {tolerance:.0e}), precision "
            f"{report.precision}, {report.device}",
        )


def overflow_and_oom(tmp: Path) -> None:
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    images[1:3] = 255  # bright images 1 and 2
    bright = tmp / "bright.npz"
    np.savez(bright, images=images)
    out = tmp / "bright.parquet"
    device = ["--device", DEVICE]
    code, stderr = run_cli(
        "gpu_check:make_overflow_model", bright, "-o", out, "--amp", "fp16", *device
    )
    expected = f"error: {bright}[1]: the model's output is not finite"
    check(
        "fp16 overflow refused",
        code == 2 and stderr.startswith(expected) and "--amp bf16" in stderr and not out.exists(),
        f"exit {code}: {stderr}",
    )
    codes = [
        run_cli("gpu_check:make_overflow_model", bright, "-o", out, *amp, *device)[0]
        for amp in ([], ["--amp", "bf16"])
    ]
    check("same model in float32 and bf16", codes == [0, 0], f"exit codes {codes}")
    code, stderr = run_cli("gpu_check:make_petabyte_model", tmp / "rgb.npz", "-o", out, *device)
    check(
        "out of memory: one line, --batch-size hint",
        code == 2
        and "out of memory" in stderr
        and "--batch-size 32" in stderr
        and "\n" not in stderr,
        f"exit {code}: {stderr}",
    )


def gray_array(gray: Path, tmp: Path) -> None:
    model = SmallResNet()
    out = tmp / "gray_cuda.parquet"
    try:
        api.extract(model, api.discover(gray), out, device=DEVICE)  # pinned batches
    except Exception as error:  # the check reports whatever went wrong
        check("gray (N,1,H,W) float array, --channels 3", False, f"{type(error).__name__}: {error}")
        return
    diff = float(np.abs(probs_of(out) - probs_of(tmp / "gray_cpu.parquet")).max())
    check("gray (N,1,H,W) float array, --channels 3", diff <= 1e-5, f"max |diff| vs CPU {diff:.2e}")


def placement(model, rgb: Path, tmp: Path) -> None:
    api.extract(model, api.discover(rgb), tmp / "p.parquet", device=DEVICE)
    devices = {tensor.device.type for tensor in model.state_dict().values()}
    check("caller's model given back on the CPU", devices == {"cpu"}, f"devices after: {devices}")
    scripted = tmp / "attr.pt"
    torch.jit.save(torch.jit.script(WithTensorAttribute().eval()), scripted)
    loaded = api.load_model(scripted, device=DEVICE)
    try:
        api.extract(loaded, api.discover(rgb), tmp / "attr.parquet", device=DEVICE)
        check("TorchScript tensor attribute, map_location", True, f"ran on {DEVICE}")
    except CnnbalError as error:
        check("TorchScript tensor attribute, map_location", False, str(error))


def throughput(tmp: Path) -> None:
    n_images, batch_size = (8192, 256) if DEVICE == "cuda" else (256, 64)
    images = np.random.default_rng(1).integers(0, 256, (n_images, 64, 64, 3), dtype=np.uint8)
    data = tmp / "throughput.npz"
    np.savez(data, images=images)
    device = api.resolve_device(DEVICE)
    model = SmallResNet().to(device)
    mean = torch.tensor(api.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(api.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    host = torch.from_numpy(images)

    def bare_loop() -> None:
        with torch.inference_mode():
            for start in range(0, n_images, batch_size):
                batch = host[start : start + batch_size]
                if device.type == "cuda":
                    batch = batch.pin_memory().to(device, non_blocking=True)
                inputs = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
                torch.softmax(model(inputs).float(), dim=1).cpu().numpy()

    source = api.discover(data)

    def cnnbal_extract():
        return api.extract(model, source, tmp / "t.parquet", device=device, batch_size=batch_size)

    bare_loop(), cnnbal_extract()  # warm-up: kernels, cuDNN plans
    timings = {"bare": [], "extract": []}
    for _ in range(3):
        for name, run in (("bare", bare_loop), ("extract", cnnbal_extract)):
            begin = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - begin)
    bare, extract = min(timings["bare"]), min(timings["extract"])
    check(
        "throughput vs a bare torch loop",
        True,
        f"{n_images} images 64x64, batch {batch_size}: bare {n_images / bare:,.0f} img/s, "
        f"extract {n_images / extract:,.0f} img/s (with the parquet file), "
        f"extract/bare time {extract / bare:.2f} (best of 3)",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--device", "cpu"]:
        DEVICE = "cpu"
    elif sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [--device cpu]")
    sys.exit(main())
