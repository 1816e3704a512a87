"""extract on CUDA, shown on the CPU: each CUDA behaviour is imitated, each decision checked.

The numbered sections follow issue 11: (1) pinned batches, (2) non-finite outputs,
(3) device errors, (4) a GPU-safe suite, (5) TF32, (6) --amp and --device checks,
(7) timing, (8) workers and /dev/shm, (9) TorchScript's map_location.
benchmarks/gpu_check.py proves the same on a real GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

import pyarrow.parquet as pq  # noqa: E402

from cnnbal import extract as api  # noqa: E402
from cnnbal.errors import CnnbalError  # noqa: E402
from cnnbal.extract import batches, devices  # noqa: E402
from cnnbal.extract import run as run_module  # noqa: E402
from tests.extract.helpers import (  # noqa: E402
    TORCHSCRIPT_WARNING,
    error_line,
    forward,
    install_fake_cuda,
    read_vectors,
    reference_input,
    run_cli,
)

pytestmark = TORCHSCRIPT_WARNING


def pin_like_cuda(tensor):
    """What the data loader's ``pin_memory`` does to a batch on CUDA, without a GPU.

    ``Tensor.pin_memory`` allocates page-locked storage with the batch's own
    sizes and strides and copies the batch into it; the copy is the step that
    fails for a stride-0 view, and it runs the same on the CPU.
    """
    pinned = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype)
    return pinned.copy_(tensor)


def solid_png(path, value, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------
# 1. Every batch is contiguous, so pinning it on CUDA cannot fail.


def test_pinning_imitation_fails_on_a_stride_0_view_as_cuda_does():
    gray = torch.rand(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="more than one element"):
        pin_like_cuda(gray.expand(-1, 3, -1, -1))  # the view extract used to make
    assert torch.equal(
        pin_like_cuda(gray.expand(-1, 3, -1, -1).contiguous()), gray.repeat(1, 3, 1, 1)
    )


@pytest.mark.parametrize(
    ("images", "prep"),
    [
        # the case: gray float (N, 1, H, W), --channels 3, no resize
        (np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32), api.Preprocessing()),
        (
            np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32),
            api.Preprocessing(size=6),
        ),
        (
            np.random.default_rng(2).random((5, 3, 9, 9), dtype=np.float32),
            api.Preprocessing(crop=5),
        ),
        (np.full((5, 8, 8, 1), 7, dtype=np.uint8), api.Preprocessing()),
        (np.full((5, 9, 9, 3), 7, dtype=np.uint8), api.Preprocessing(crop=5)),
    ],
)
def test_every_array_batch_is_contiguous_and_survives_pinning(tmp_path, images, prep):
    data = tmp_path / "images.npy"
    np.save(data, images)
    loader = batches.make_loader(api.discover(data), prep, 2, 0, pin_memory=False)
    n_seen = 0
    for positions, batch, bad, fatal in loader:
        assert fatal is None and bad == []
        assert batch.is_contiguous()
        assert torch.equal(pin_like_cuda(batch), batch)
        n_seen += len(positions)
    assert n_seen == 5


def test_every_file_batch_is_contiguous(class_folder):
    prep = api.Preprocessing(size=16, crop=14)
    loader = batches.make_loader(api.discover(class_folder), prep, 4, 0, pin_memory=False)
    assert all(batch.is_contiguous() for _, batch, _, _ in loader)


def test_gray_float_array_runs_with_pinned_batches(monkeypatch, tmp_path):
    """The issue's case end to end, every batch pinned as on CUDA: same probs as a direct pass."""
    from _tiny_model import make_model

    images = np.random.default_rng(3).random((5, 1, 8, 8), dtype=np.float32)
    data = tmp_path / "gray.npy"
    np.save(data, images)
    make_loader = batches.make_loader

    def pinned_loader(*args, **kwargs):
        for positions, batch, bad, fatal in make_loader(*args, **kwargs):
            yield positions, pin_like_cuda(batch), bad, fatal

    monkeypatch.setattr(batches, "make_loader", pinned_loader)
    model, out = make_model(), tmp_path / "probs.parquet"
    prep = api.Preprocessing(mean=(0.5,), std=(0.25,))
    api.extract(model, api.discover(data), out, preprocessing=prep, device="cpu", batch_size=2)
    expected_input = (torch.from_numpy(images).repeat(1, 3, 1, 1) - 0.5) / 0.25
    _, expected = forward(model, expected_input)
    np.testing.assert_allclose(read_vectors(pq.read_table(out), "probs"), expected, atol=1e-6)


# ---------------------------------------------------------------------------
# 2. Non-finite outputs are refused, naming the first bad image.


@pytest.fixture
def bright_and_dark(tmp_path):
    """A flat folder: a dark, two bright, a dark image (bright ones overflow fp16 logits)."""
    root = tmp_path / "bright"
    for index, value in enumerate([0, 255, 255, 0]):
        solid_png(root / f"x{index}.png", value)
    return root


def test_fp16_overflow_is_refused_naming_the_first_bad_image(
    monkeypatch, bright_and_dark, tmp_path
):
    """fp16 autocast forced through on the CPU, as on CUDA: logits above 65504 become inf."""
    from _tiny_model import make_overflow_model

    monkeypatch.setattr(
        devices, "autocast_dtype", lambda amp, device: torch.float16 if amp == "fp16" else None
    )
    source, out_dir = api.discover(bright_and_dark), tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CnnbalError) as refused:
        api.extract(make_overflow_model(), source, out_dir / "p.parquet", device="cpu", amp="fp16")
    message = str(refused.value)
    assert message.startswith(f"{bright_and_dark / 'x1.png'}: the model's output is not finite")
    assert "(and 1 more in its batch)" in message
    assert "--amp bf16 or without --amp" in message
    assert list(out_dir.iterdir()) == []
    # the same model in float32 and in bf16 (float32's range) is fine
    for amp in (None, "bf16"):
        api.extract(make_overflow_model(), source, out_dir / "p.parquet", device="cpu", amp=amp)
        probs = read_vectors(pq.read_table(out_dir / "p.parquet"), "probs")
        assert np.isfinite(probs).all() and probs[1, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_model_returning_inf_or_nan_in_float32_is_refused(class_folder, tmp_path, value):
    from _tiny_model import PoisonedNet

    out = tmp_path / "p.parquet"
    with pytest.raises(CnnbalError, match="not finite") as refused:
        api.extract(
            PoisonedNet(row=1, value=value),
            api.discover(class_folder),
            out,
            preprocessing=api.Preprocessing(crop=16),
            device="cpu",
            batch_size=4,
        )
    assert str(refused.value).startswith(f"{class_folder / 'cat' / 'img1.png'}: ")
    assert "in float32" in str(refused.value)
    assert not out.exists()


def test_cli_refuses_nan_outputs_with_exit_2(class_folder, tmp_path):
    out = tmp_path / "p.parquet"
    result = run_cli(
        "_tiny_model:make_nan_model", class_folder, "-o", out, "--crop", 16, "--device", "cpu"
    )
    assert result.exit_code == 2
    assert f"{class_folder / 'cat' / 'img1.png'}: the model's output is not finite" in error_line(
        result
    )
    assert not out.exists()


def test_saved_logits_must_be_finite_too(flat_folder, tmp_path):
    """-inf logits give a probability of 0 (finite), but the logits column would hold -inf."""
    from _tiny_model import PoisonedNet

    model, source = PoisonedNet(row=0, value=float("-inf")), api.discover(flat_folder)
    api.extract(model, source, tmp_path / "a.parquet", device="cpu")
    with pytest.raises(CnnbalError, match="not finite"):
        api.extract(model, source, tmp_path / "b.parquet", device="cpu", save_logits=True)


# ---------------------------------------------------------------------------
# 3. Device errors: one line, exit 2, what to do.


def test_out_of_memory_is_one_line_with_a_batch_size_hint(class_folder, tmp_path):
    out = tmp_path / "p.parquet"
    args = ["_tiny_model:make_oom_model", class_folder, "-o", out, "--crop", 16, "--device", "cpu"]
    result = run_cli(*args)
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith("error: _tiny_model:make_oom_model: out of memory on cpu with a batch")
    assert "CUDA out of memory. Tried to allocate 20.00 GiB" in line
    assert "a batch of 9 images" in line  # all nine fit in one batch of --batch-size 64
    assert "lower --batch-size (e.g. --batch-size 4)" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                "devices, cuda:0 and cpu!"
            ),
            "the model mixes devices",
        ),
        (
            RuntimeError(
                "Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) "
                "should be the same"
            ),
            "the model mixes devices",
        ),
        (torch.OutOfMemoryError("CUDA out of memory."), "lower --batch-size"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), "--batch-size 2"),
        (RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable"), "busy"),
    ],
)
def test_device_errors_in_the_forward_pass(flat_folder, tmp_path, error, expected):
    from _tiny_model import RaisingNet

    with pytest.raises(CnnbalError, match=expected) as refused:
        api.extract(
            RaisingNet(error), api.discover(flat_folder), tmp_path / "p.parquet", device="cpu",
            model_name="net.pt",
        )  # fmt: skip
    assert "\n" not in str(refused.value)


def test_a_busy_device_when_moving_the_model(monkeypatch, flat_folder, tmp_path):
    from _tiny_model import TinyNet

    class BusyDeviceNet(TinyNet):
        def to(self, *args, **kwargs):
            if torch.device(args[0]).type == "cuda":
                raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
            return super().to(*args, **kwargs)

    install_fake_cuda(monkeypatch, n_devices=2)
    with pytest.raises(CnnbalError) as refused:
        api.extract(
            BusyDeviceNet(), api.discover(flat_folder), tmp_path / "p.parquet", device="cuda:1"
        )
    assert str(refused.value).startswith("cuda:1: the device is busy or unavailable")
    assert "--device cuda:N" in str(refused.value)


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="the move would succeed here")
def test_a_model_that_cannot_be_moved(monkeypatch, model, flat_folder, tmp_path):
    install_fake_cuda(monkeypatch)  # CUDA "available" to a torch built without it
    with pytest.raises(CnnbalError) as refused:
        api.extract(model, api.discover(flat_folder), tmp_path / "p.parquet",
                    device="cuda:0", model_name="net.pt")  # fmt: skip
    assert str(refused.value).startswith("net.pt: cannot move the model to cuda:0 (")
    assert next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------
# 4. A GPU-safe suite: device choice, the caller's model given back.


def test_auto_and_cuda_resolve_to_an_indexed_cuda_device(monkeypatch):
    install_fake_cuda(monkeypatch, n_devices=2, current=1)
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert devices.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("n_devices", "accepted"), [(2, False), (8, True)])
def test_cuda_index_is_checked_against_the_device_count(monkeypatch, n_devices, accepted):
    install_fake_cuda(monkeypatch, n_devices=n_devices)
    if accepted:
        assert devices.resolve_device("cuda:7") == torch.device("cuda", 7)
    else:
        with pytest.raises(CnnbalError, match="only 2 CUDA device"):
            devices.resolve_device("cuda:7")


def test_no_cuda_means_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CnnbalError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    assert devices.resolve_device("auto") == torch.device("cpu")


class RecordingNet(torch.nn.Module):
    """Records the devices it is moved to, without moving (there is no GPU here)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(torch.device(args[0]))
        return self


def test_model_is_moved_back_and_its_mode_restored():
    model = RecordingNet().train()
    with devices.model_on(model, torch.device("cuda", 3), "net"):
        assert not model.training
    assert model.moves == [torch.device("cuda", 3), torch.device("cpu")]
    assert model.training
    model = RecordingNet().train()
    with pytest.raises(KeyError), devices.model_on(model, torch.device("cuda", 0), "net"):
        raise KeyError("a failing run")
    assert model.moves == [torch.device("cuda", 0), torch.device("cpu")] and model.training


def test_extract_gives_the_callers_model_back_also_when_the_run_fails(
    monkeypatch, flat_folder, tmp_path
):
    model = RecordingNet().train()
    install_fake_cuda(monkeypatch)
    with contextlib.suppress(Exception):  # no GPU: the run fails once the model "moved"
        api.extract(model, api.discover(flat_folder), tmp_path / "p.parquet", device="cuda:0")
    assert model.moves == [torch.device("cuda", 0), torch.device("cpu")]
    assert model.training
    assert not (tmp_path / "p.parquet").exists()


def test_extract_on_the_cpu_leaves_the_model_as_it_was(model, flat_folder, tmp_path):
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    api.extract(model, api.discover(flat_folder), tmp_path / "p.parquet", device="cpu")
    assert model.training
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[name])


# ---------------------------------------------------------------------------
# 5. IEEE float32 by default; TF32 only when asked for.


def test_float32_by_default_and_tf32_on_request(flat_folder, tmp_path):
    from _tiny_model import TinyNet

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has no per-backend fp32_precision")
    seen = []

    class PrecisionProbe(TinyNet):
        def forward(self, images):
            seen.append(
                (
                    torch.backends.cudnn.conv.fp32_precision,
                    torch.backends.cuda.matmul.fp32_precision,
                )
            )
            return super().forward(images)

    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    source = api.discover(flat_folder)
    report = api.extract(PrecisionProbe(), source, tmp_path / "a.parquet", device="cpu")
    assert seen == [("ieee", "ieee")] and report.precision == "float32"
    api.extract(PrecisionProbe(), source, tmp_path / "b.parquet", device="cpu", tf32=True)
    assert seen[-1] == ("tf32", "tf32")
    after = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    assert after == before  # process-wide settings are put back
    assert devices.precision_name(None, True, torch.device("cuda", 0)) == "tf32"
    assert devices.precision_name(None, True, torch.device("cpu")) == "float32"
    assert devices.precision_name(torch.float16, False, torch.device("cuda", 0)) == "fp16"


# ---------------------------------------------------------------------------
# 6. --amp and --device: what each device supports, said plainly.


def test_amp_on_mps_names_what_is_supported():
    for amp in ("bf16", "fp16"):
        with pytest.raises(CnnbalError) as refused:
            devices.autocast_dtype(amp, torch.device("mps"))
        message = str(refused.value)
        assert message.startswith(f"--amp {amp}: not supported on mps")
        assert "run without --amp" in message and "fp16 needs CUDA" not in message
    with pytest.raises(CnnbalError, match="on the CPU use --amp bf16"):
        devices.autocast_dtype("fp16", torch.device("cpu"))
    assert devices.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_bf16_support_is_checked_on_the_requested_cuda_device(monkeypatch):
    # device 0 (current) supports bf16, device 1 (compute capability 7.5) does not
    install_fake_cuda(monkeypatch, n_devices=2, capabilities={0: (8, 0), 1: (7, 5)}, current=0)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(CnnbalError) as refused:
        devices.autocast_dtype("bf16", torch.device("cuda", 1))
    assert "cuda:1 (Fake GPU 1, compute capability 7.5) has no bf16 support" in str(refused.value)
    assert devices.autocast_dtype("fp16", torch.device("cuda", 1)) is torch.float16
    # and a bf16 device is accepted while the current device has no bf16
    install_fake_cuda(monkeypatch, n_devices=2, capabilities={0: (8, 0), 1: (7, 5)}, current=1)
    assert devices.autocast_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16


@pytest.mark.parametrize("device", ["cpu:1", "cpu:3"])
def test_cpu_with_an_index_is_refused(device):
    with pytest.raises(CnnbalError, match="the CPU is one device"):
        devices.resolve_device(device)
    assert devices.resolve_device("cpu:0") == torch.device("cpu")


# ---------------------------------------------------------------------------
# 7. The reported time starts at the first batch.


def test_time_excludes_device_start_up_and_the_model_transfer(monkeypatch, class_folder, tmp_path):
    """A fake clock: placing the model costs 100 "seconds", each batch 1."""
    from _tiny_model import TinyNet

    clock = {"now": 0.0}
    monkeypatch.setattr(run_module, "_clock", lambda: clock["now"])

    class ClockedNet(TinyNet):
        def eval(self):  # model_on sets eval mode while it places the model
            clock["now"] += 100.0
            return super().eval()

        def forward(self, images):
            clock["now"] += 1.0
            return super().forward(images)

    report = api.extract(
        ClockedNet(),
        api.discover(class_folder),
        tmp_path / "p.parquet",
        preprocessing=api.Preprocessing(crop=16),
        device="cpu",
        batch_size=4,
    )
    assert report.setup_seconds == 100.0
    assert report.seconds == 3.0  # three batches: 4 + 4 + 1 images
    assert report.images_per_second == 3.0


# ---------------------------------------------------------------------------
# 8. Workers fit in /dev/shm.


def test_workers_are_capped_by_shared_memory():
    batch = 64 * 224 * 224 * 3  # 9.6 MB of uint8 pixels
    assert devices.workers_for_shared_memory(8, batch, 64 * 2**20) == 1  # docker's default
    assert devices.workers_for_shared_memory(8, batch, 16 * 2**30) == 8
    assert devices.workers_for_shared_memory(8, batch, 10 * 2**20) == 0
    assert devices.workers_for_shared_memory(8, batch, None) == 8  # no /dev/shm
    assert devices.workers_for_shared_memory(0, batch, 64 * 2**20) == 0
    assert devices.shm_free_bytes("/no/such/folder") is None


def test_default_cuda_workers_in_a_small_container(monkeypatch, class_folder):
    monkeypatch.setattr(devices, "_n_cpus", lambda: 16)
    monkeypatch.setattr(devices, "shm_free_bytes", lambda path="/dev/shm": 64 * 2**20)
    source, prep = api.discover(class_folder), api.Preprocessing(size=256, crop=224)
    workers, notes = run_module._choose_workers(None, torch.device("cuda", 0), source, prep, 64)
    assert workers == 1
    assert (
        "1 data loader worker(s) instead of 8" in notes[0] and "/dev/shm (64 MB free)" in notes[0]
    )
    assert run_module._choose_workers(None, torch.device("cpu"), source, prep, 64) == (0, ())


def test_capped_workers_still_give_the_same_probs(monkeypatch, model, class_folder, tmp_path):
    monkeypatch.setattr(devices, "shm_free_bytes", lambda path="/dev/shm": 4096)
    out, prep = tmp_path / "p.parquet", api.Preprocessing(size=16, crop=16)
    report = api.extract(
        model, api.discover(class_folder), out, preprocessing=prep, device="cpu", workers=2
    )
    assert report.workers == 0 and "instead of 2" in report.notes[0]
    files = sorted(class_folder.glob("*/*.png"))
    _, expected = forward(model, [reference_input(f, size=16, crop=16) for f in files])
    np.testing.assert_allclose(read_vectors(pq.read_table(out), "probs"), expected, atol=1e-6)


# ---------------------------------------------------------------------------
# 9. A TorchScript archive is loaded onto the device it runs on.


def test_torchscript_is_loaded_with_map_location_the_target_device(
    monkeypatch, scripted_path, flat_folder, tmp_path
):
    jit_load, seen = torch.jit.load, []

    def recording_load(path, map_location=None, **kwargs):
        seen.append(map_location)
        return jit_load(path, map_location="cpu", **kwargs)  # no GPU here to load onto

    monkeypatch.setattr(torch.jit, "load", recording_load)
    api.load_model(scripted_path, device="cpu")
    api.load_model(scripted_path, device=torch.device("cuda", 1))
    assert seen == [torch.device("cpu"), torch.device("cuda", 1)]
    # the command resolves the device first and loads onto it
    install_fake_cuda(monkeypatch, n_devices=2)
    run_cli(scripted_path, flat_folder, "-o", tmp_path / "p.parquet", "--device", "cuda:1")
    assert seen[-1] == torch.device("cuda", 1)
