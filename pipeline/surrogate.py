"""The smooth surrogate: a copy of the classifier with softplus activations, distilled on the classifier's own
predictions under input noise and mixup (as the SCE authors do), so its input gradients are smoother.
The surrogate only steers the search; success is always judged on the original classifier."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pipeline.train import make_trainer


def smooth_copy(model: nn.Module, beta: float = 4.0) -> nn.Module:
    """A copy with every nn.ReLU replaced by Softplus(beta): same weights, smooth everywhere."""
    student = copy.deepcopy(model)
    for module in list(student.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Softplus(beta=beta))
    return student


class SurrogateSystem(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 3.0,
        noise: float = 0.1,
        mixup: float = 0.4,
        lr: float = 5e-4,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)

    def forward(self, x):
        return self.student(x)

    def training_step(self, batch, batch_idx):
        x, hp = batch[0], self.hparams
        if hp.mixup > 0:  # mix pairs of images so the surrogate also learns the space between them
            lam = torch.distributions.Beta(hp.mixup, hp.mixup).sample((x.shape[0], 1, 1, 1)).to(x)
            x = lam * x + (1 - lam) * x[torch.randperm(x.shape[0], device=x.device)]
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / hp.temperature, -1)
        log_p = F.log_softmax(self.student(x + hp.noise * torch.randn_like(x)) / hp.temperature, -1)
        loss = F.kl_div(log_p, soft, reduction="batchmean") * hp.temperature**2
        self.log("distill_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=self.hparams.lr)


def distil(
    classifier: nn.Module, dataset, epochs: int, accelerator: str = "auto", batch_size: int = 64
) -> tuple[nn.Module, float]:
    """Train the surrogate on ``dataset`` (items (x, y, i)); return it and its agreement with the classifier."""
    student = smooth_copy(classifier).train().requires_grad_(True)
    system = SurrogateSystem(student, classifier)
    trainer = make_trainer(max_epochs=epochs, accelerator=accelerator)
    trainer.fit(system, DataLoader(dataset, batch_size=batch_size, shuffle=True))
    student = student.cpu().eval()
    agree, total = 0, 0
    with torch.no_grad():
        for x, _, _ in DataLoader(dataset, batch_size=256):
            agree += (student(x).argmax(1) == classifier.cpu()(x).argmax(1)).sum().item()
            total += len(x)
    return student, agree / max(total, 1)
