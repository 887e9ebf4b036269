"""Margin-softmax losses: a target-logit transform plus an objective (see ``base``)."""

from partialfc.losses.base import MarginLoss
from partialfc.losses.dsoftmax import DSoftmax
from partialfc.losses.margins import ArcFace, CombinedMargin, CosFace, NormFace
from partialfc.losses.registry import LOSSES, build_loss, loss_parameters
from partialfc.losses.search import RandomSoftmax, SearchSoftmax
from partialfc.losses.x2 import X2Softmax

__all__ = ["MarginLoss", "NormFace", "CosFace", "CombinedMargin", "ArcFace", "X2Softmax", "DSoftmax",
           "SearchSoftmax", "RandomSoftmax", "LOSSES", "build_loss", "loss_parameters"]
