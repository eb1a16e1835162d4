"""Pretraining by our own code on data held apart from the stream.

No pretrained weights can be downloaded here, so the papers' "pretrained backbone" settings
(Smith et al.'s L2-vs-EWC claim; OVOR's frozen ViT) are reproduced by training the model on the
held-apart share of the data (or on a user's .npz) first. Only the backbone is pretrained: a
temporary head sized to the pretraining labels is trained with it and thrown away, so the
learner starts with a fresh classifier on top of a pretrained network.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong.config import PretrainConfig


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig, seed: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Train ``model.backbone`` (prompt off) through ``model.features`` on (x, y). Returns stats."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    with torch.no_grad():
        dim = model.features(x[:2].to(device)).shape[1]
    head = nn.Linear(dim, int(y.max()) + 1).to(device)
    opt = torch.optim.Adam([*model.backbone.parameters(), *head.parameters()], lr=cfg.lr)
    loss = torch.zeros(())
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(head(model.features(x[idx].to(device))), y[idx].to(device))
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((head(model.features(x.to(device))).argmax(1).cpu() == y).float().mean())
    model.train()
    return {"pretrain_loss": float(loss.detach()), "pretrain_train_acc": acc}
