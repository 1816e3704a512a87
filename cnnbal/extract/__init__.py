"""Run a torch image classifier over images and write the probability file.

This is the optional front end of cnnbal (the ``extract`` extra: torch and
Pillow). It turns a trained classifier and a set of images into the parquet
file that :mod:`cnnbal.io` reads::

    label   int64                        (only when the labels are known)
    probs   fixed_size_list<float32>[K]  softmax of the logits, rows sum to 1
    logits  fixed_size_list<float32>[K]  (only with ``save_logits=True``)
    path    string                       file path, or "images.npz[17]" for arrays

with the class names as a JSON list under the schema metadata key
``b"cnnbal.class_names"``.

torch and Pillow are imported inside the functions that need them, so that
``import cnnbal`` never pulls in torch.

Preprocessing (see :class:`Preprocessing`), in this order, per image:

1. decode with Pillow and convert to RGB (``channels=3``) or luminance
   (``channels=1``, Pillow's ``"L"``: ITU-R 601-2 weights);
2. if ``size`` is set, resize (bilinear, antialiased) so that the shorter side
   is ``size`` pixels, keeping the aspect ratio (the longer side is
   ``int(size * long / short)``, as torchvision's ``Resize(size)``);
3. if ``crop`` is set, cut the central ``crop`` x ``crop`` square (offsets
   ``round((h - crop) / 2)``, as torchvision's ``CenterCrop``);
4. scale to [0, 1] (divide by 255) and normalise each channel,
   ``(x - mean) / std``; channels first, float32, shape ``(C, H, W)``.

Steps 1-3 run on the CPU in the data loader (workers), step 4 on the target
device. Float arrays ``(N, C, H, W)`` are taken as already scaled to [0, 1]:
they skip the division, are resized with ``torch.nn.functional.interpolate``
(bilinear, antialiased) and then normalised; pass ``mean=(0.0,)`` and
``std=(1.0,)`` for arrays that are already normalised.

Numerics: the forward pass runs in IEEE float32 unless asked otherwise, also
on CUDA (TF32 only with ``tf32=True``), so CPU and CUDA probabilities agree to
about 1e-6; ``amp="bf16"``/``"fp16"`` run it under ``torch.autocast``. The
softmax is float32, and a batch whose outputs are not finite (fp16 overflow, a
model producing NaN) is refused, naming the first image.

One job per module: :mod:`~cnnbal.extract.preprocessing` (steps 1-4),
:mod:`~cnnbal.extract.sources` (finding images and labels),
:mod:`~cnnbal.extract.models` (loading a model), :mod:`~cnnbal.extract.devices`
(device, precision, placing the model, what device errors mean),
:mod:`~cnnbal.extract.batches` (the data loader), :mod:`~cnnbal.extract.run`
(the loop and its checks) and :mod:`~cnnbal.extract.writer` (the parquet file).
"""

from cnnbal.extract.devices import resolve_device
from cnnbal.extract.models import load_model
from cnnbal.extract.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INSTALL_HINT,
    Preprocessing,
    load_image,
    preprocess,
    require_torch,
)
from cnnbal.extract.run import ExtractReport, ProgressCallback, extract
from cnnbal.extract.sources import IMAGE_EXTENSIONS, ImageSource, discover
from cnnbal.extract.writer import MAX_ROWS_PER_GROUP, OUTPUT_SUFFIX, check_output_path

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INSTALL_HINT",
    "MAX_ROWS_PER_GROUP",
    "OUTPUT_SUFFIX",
    "ExtractReport",
    "ImageSource",
    "Preprocessing",
    "ProgressCallback",
    "check_output_path",
    "discover",
    "extract",
    "load_image",
    "load_model",
    "preprocess",
    "require_torch",
    "resolve_device",
]
