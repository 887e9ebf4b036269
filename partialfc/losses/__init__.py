"""Margin-softmax losses: a target-logit transform plus an objective (see ``base``)."""

from partialfc.losses.base import MarginLoss
from partialfc.losses.margins import ArcFace, CosFace, NormFace
from partialfc.losses.registry import LOSSES, build_loss

__all__ = ["MarginLoss", "NormFace", "CosFace", "ArcFace", "LOSSES", "build_loss"]
