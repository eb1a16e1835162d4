"""Pretraining by our own code on data held apart from the stream.

No pretrained weights can be downloaded here, so the papers' "pretrained backbone" settings
(Smith et al.'s L2-vs-EWC claim; OVOR's frozen ViT) are reproduced by training the model on the
held-apart share of the data first. Only the backbone is kept: the head is re-initialised, as
a downstream learner gets a fresh classifier on top of a pretrained network.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong.config import PretrainConfig


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig, seed: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Train ``model`` (prompt off) on (x, y); then re-initialise its head. Returns final stats."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for name, p in model.named_parameters() if not name.startswith("prompt.")]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    model.to(device).train()
    loss = torch.zeros(())
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
    model.head.reset_parameters()
    return {"pretrain_loss": float(loss), "pretrain_train_acc": acc}
