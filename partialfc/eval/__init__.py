"""Evaluation: pair verification on ``.bin`` sets."""

from partialfc.eval.verification import (VerificationResult, VerificationSet, embed_images, tar_at_far,
                                         verification_metrics)

__all__ = ["VerificationResult", "VerificationSet", "embed_images", "tar_at_far", "verification_metrics"]
