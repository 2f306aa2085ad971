"""``cfkd generator train``: train the embedded generic codec (a small diffusers AutoencoderTiny or AutoencoderKL)
on the procedural corpus with Lightning, save it with ``save_pretrained`` and a JSON card with its PSNR."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline import corpus, generator
from pipeline.config import SquareConfig


@dataclass(frozen=True)
class CodecConfig:
    kind: str = "AutoencoderTiny"  # or AutoencoderKL
    channels: tuple[int, ...] = (48, 48, 48)  # block widths; len - 1 halvings (3 -> latent at 1/4 side)
    latent_channels: int = 4
    corpus_size: int = 6000  # procedural images, generated once
    size: int = 64  # training crop side
    batch_size: int = 16
    lr: float = 1e-3
    max_steps: int = 3000
    max_minutes: float = 50.0  # CPU budget: whichever of max_steps / max_minutes comes first
    seed: int = 0


def build_vae(c: CodecConfig) -> nn.Module:
    import diffusers

    if c.kind == "AutoencoderTiny":
        blocks = (1,) + (2,) * (len(c.channels) - 1)
        return diffusers.AutoencoderTiny(
            encoder_block_out_channels=c.channels,
            decoder_block_out_channels=c.channels,
            num_encoder_blocks=blocks,
            num_decoder_blocks=blocks[::-1],
            latent_channels=c.latent_channels,
        )
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(c.channels),
        up_block_types=("UpDecoderBlock2D",) * len(c.channels),
        block_out_channels=c.channels,
        layers_per_block=1,
        latent_channels=c.latent_channels,
        norm_num_groups=min(16, c.channels[0]),
        sample_size=c.size,
    )


class CorpusDataset(Dataset):
    """Corpus images in [-1, 1] with random flips and 90-degree rotations."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i].float() / 127.5 - 1
        k = int(torch.randint(0, 4, ()))
        x = torch.rot90(x, k, (1, 2))
        return x.flip(2) if torch.rand(()) < 0.5 else x


class CodecSystem(L.LightningModule):
    def __init__(self, vae: nn.Module, lr: float, max_steps: int):
        super().__init__()
        self.save_hyperparameters(ignore=["vae"])
        self.codec = generator.Codec(vae)
        self.codec.vae.requires_grad_(True).train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec(x)

    def training_step(self, x, batch_idx):
        recon = self(x)
        loss = nn.functional.mse_loss(recon, x) + 0.5 * nn.functional.l1_loss(recon, x)
        self.log("loss", loss, prog_bar=True)
        self.log("psnr", generator.psnr(recon.detach(), x), prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, self.hparams.lr, total_steps=self.hparams.max_steps, pct_start=0.05
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def square_psnr(codec: generator.Codec, size: int = 64, n: int = 48, seed: int = 123) -> dict:
    """Reconstruction PSNR on Square images the codec never saw, noise-free and with the default noise."""
    import tempfile

    from pipeline import square
    from pipeline.data import load_folder, make_transform

    result = {}
    for noise in (0.0, 20.0):
        with tempfile.TemporaryDirectory() as tmp:
            square.generate(tmp, SquareConfig(n=n, size=size, noise=noise, seed=seed, poison=0.5))
            data = load_folder(tmp)
            transform = make_transform(size)
            from PIL import Image

            x = torch.stack([transform(Image.open(data.root / p).convert("RGB")) for p in data.table["path"]])
            result[f"psnr_{size}px_noise{int(noise)}"] = round(generator.psnr(codec(x), x), 2)
    result[f"noise_floor_{size}px_noise20"] = round(float(20 * np.log10(255 / 20)), 2)
    return result


def train(out: Path, c: CodecConfig = CodecConfig(), verbose: bool = False) -> dict:
    L.seed_everything(c.seed, verbose=False)
    started = time.perf_counter()
    images = corpus.generate(c.corpus_size, c.size, c.seed)
    loader = DataLoader(CorpusDataset(images), batch_size=c.batch_size, shuffle=True, drop_last=True)
    vae = build_vae(c)
    system = CodecSystem(vae, c.lr, c.max_steps)
    from pipeline.train import make_trainer

    trainer = make_trainer(
        verbose=verbose,
        max_epochs=None,
        max_steps=c.max_steps,
        max_time={"minutes": c.max_minutes},
        logger=L.pytorch.loggers.CSVLogger(out, name="logs", version=""),
        log_every_n_steps=25,
    )
    trainer.fit(system, loader)
    vae.eval()
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    codec = generator.Codec(vae)
    card = {
        "model": c.kind,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "config": asdict(c),
        "corpus": corpus.RECIPE,
        "steps": trainer.global_step,
        "train_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        **square_psnr(codec, 64),
        **square_psnr(codec, 128, n=24),
    }
    (out / "cfkd_card.json").write_text(json.dumps(card, indent=2))
    return card
