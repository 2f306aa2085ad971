"""The generative model of the explain stage: a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` loaded with
``from_pretrained`` from a local folder or a hub id (offline: from the local cache only, with a clear error).

``Codec`` gives the explainer one interface: ``encode(x) -> z`` and ``decode(z) -> x`` on images in [-1, 1];
``pooled`` summarises a code as its colour and layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from pipeline.errors import UserError

CLASSES = ("AutoencoderKL", "AutoencoderTiny")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = "checkpoints/generic-codec"  # the embedded codec, trained by `cfkd generator train`


class Codec(nn.Module):
    """Encode / decode through either autoencoder class; deterministic (the KL posterior's mean)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.kind = type(vae).__name__

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x)
        return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def resolve(source: str) -> Path | None:
    """A local folder for ``source`` (as given, or relative to the repository), or None for a hub id."""
    for candidate in (Path(source).expanduser(), REPO_ROOT / source):
        if candidate.is_dir():
            return candidate
    return None


def fingerprint(source: str) -> str:
    """Identity of a generator for stage skipping: a hash of a local folder's weights, else the hub id."""
    folder = resolve(source)
    if folder is None:
        return source
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("config.json")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _class_of(folder: Path) -> str:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except FileNotFoundError:
        raise UserError(
            f"generator.source {folder} has no config.json: not a diffusers model folder"
        ) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"generator.source {folder}/config.json is not valid JSON ({exc})") from None
    if name not in CLASSES:
        raise UserError(
            f"generator.source {folder} holds a {name or 'unknown model'}, expected one of {', '.join(CLASSES)}"
        )
    return name


def load(source: str = DEFAULT_SOURCE, subfolder: str | None = None) -> Codec:
    """Load a codec from a local folder or a hub id (``subfolder="vae"`` for a full pipeline repository)."""
    import diffusers

    folder = resolve(source)
    if folder is not None:
        path = folder / subfolder if subfolder else folder
        model_class = getattr(diffusers, _class_of(path))
        try:
            return Codec(model_class.from_pretrained(path))
        except (
            OSError,
            ValueError,
            RuntimeError,
            SafetensorError,
        ) as exc:  # no weights, truncated, mis-shaped
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"generator.source {path}: cannot load its weights ({first})") from None
    if "/" not in source or source.startswith((".", "/", "~")):
        raise UserError(
            f"generator.source '{source}': no such folder (and not a hub id like 'madebyollin/taesd')"
        )
    errors = []
    for name in CLASSES:  # a hub id: only what is already in the local cache can be used offline
        try:
            vae = getattr(diffusers, name).from_pretrained(source, subfolder=subfolder, local_files_only=True)
            return Codec(vae)
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise UserError(
        f"generator.source '{source}' is a hub id but the model hub is unreachable and the model is not in the "
        f"local cache; on a connected machine run `huggingface-cli download {source}` (or save_pretrained it) and "
        "point generator.source at the downloaded folder"
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the batch's pixels together."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a.clamp(-1, 1), b.clamp(-1, 1), data_range=(-1.0, 1.0)))


def load_denoiser(source: str):
    """(UNet2DModel, DDPMScheduler) from a folder holding unet/ and scheduler/ (a diffusers pipeline layout), or
    from a hub id already in the local cache; used for the gradient-filtering noise/denoise pass."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = resolve(source)
    where = str(folder) if folder is not None else source
    try:
        unet = UNet2DModel.from_pretrained(where, subfolder="unet", local_files_only=folder is None)
        scheduler = DDPMScheduler.from_pretrained(
            where, subfolder="scheduler", local_files_only=folder is None
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"generator.unet '{source}': cannot load a UNet2DModel and scheduler ({str(exc).splitlines()[0]}); "
            "give a local folder with unet/ and scheduler/ subfolders"
        ) from None
    return unet.eval().requires_grad_(False), scheduler


def pooled(z: torch.Tensor, side: int = 4) -> torch.Tensor:
    """A latent code average-pooled to side x side: colour and layout, not pixels. Adaptive average pooling
    written as two matrix products, whose gradient CUDA computes deterministically (adaptive_avg_pool2d's not)."""
    rows, cols = (_bins(n, side, z) for n in z.shape[-2:])
    return torch.einsum("ih,bchw,jw->bcij", rows, z, cols).flatten(1)


def _bins(n: int, side: int, like: torch.Tensor) -> torch.Tensor:
    """side x n averaging weights of adaptive pooling: bin i covers [floor(i n / side), ceil((i + 1) n / side))."""
    weights = torch.zeros(side, n, dtype=like.dtype, device=like.device)
    for i in range(side):
        start, end = i * n // side, -(-(i + 1) * n // side)
        weights[i, start:end] = 1 / (end - start)
    return weights
