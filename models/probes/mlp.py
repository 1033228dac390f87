"""The pixel classifier: an ensemble of small MLPs over per-pixel features, majority vote (DatasetGAN's setup).

Each member is BatchNorm (the features' scales differ per layer) -> Linear -> ReLU -> BatchNorm -> Linear ->
ReLU -> BatchNorm -> Linear over `[N, D]` pixel rows; a feature map `[B, D, h, w]` is flattened to rows and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Added to the vote count: the mean probability breaks ties between classes with equal votes (< 1 vote).
TIE_BREAK = 0.5


def member(in_dim: int, hidden: tuple[int, int], classes: int) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(
        nn.BatchNorm1d(in_dim),  # UNet activations differ in scale by orders of magnitude between layers
        nn.Linear(in_dim, h1),
        nn.ReLU(),
        nn.BatchNorm1d(h1),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.BatchNorm1d(h2),
        nn.Linear(h2, classes),
    )


class PixelEnsemble(nn.Module):
    """`[B, D, h, w]` features -> `[M, B, C, h, w]` logits of the M members."""

    def __init__(self, in_dim: int, classes: int, members: int = 10, hidden: tuple[int, int] = (256, 32)) -> None:
        super().__init__()
        self.in_dim, self.classes, self.hidden = in_dim, classes, hidden
        self.members = nn.ModuleList([member(in_dim, hidden, classes) for _ in range(members)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, d, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(b * h * w, d)
        logits = torch.stack([m(rows) for m in self.members])  # [M, B*h*w, C]
        return logits.reshape(len(self.members), b, h, w, -1).permute(0, 1, 4, 2, 3)

    def scores(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Majority-vote scores `[B, C, H, W]` at `size`: each member's logits upsampled (bilinear) and argmaxed,
        votes counted, plus TIE_BREAK x the mean probability; the label is their argmax. One member at a time
        at full size, so the peak is one `[B, C, H, W]` map, not M of them."""
        return vote_scores(self(features), size)


def vote_scores(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`PixelEnsemble.scores` from the members' logits `[M, B, C, h, w]`, however they were computed (the eager
    MLPs or an ONNX graph's `logits` output): the vote is the same integer work on every backend.

    Channels-last throughout: the argmax and softmax run over the classes, which are then contiguous (measured
    at 128 px, 10 members, 6 classes: 7 ms against 11-17 ms for the MLPs' own layout and 60-95 ms for the
    contiguous `[M, B, C, h, w]` an ONNX graph returns; the same labels)."""
    b, c = logits.shape[1:3]
    votes = torch.zeros((b, c, *size), dtype=torch.float32, device=logits.device)
    votes = votes.contiguous(memory_format=torch.channels_last)
    probs = torch.zeros_like(votes)
    for member_logits in logits:
        member_logits = member_logits.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(member_logits, size=size, mode="bilinear", align_corners=False)
        votes.scatter_add_(1, up.argmax(dim=1, keepdim=True), torch.ones_like(up[:, :1]))
        probs += up.softmax(dim=1)
    return votes + (TIE_BREAK / len(logits)) * probs


def vote(scores: torch.Tensor) -> torch.Tensor:
    """`[..., C, H, W]` scores -> `[..., H, W]` class indices."""
    return scores.argmax(dim=-3)
