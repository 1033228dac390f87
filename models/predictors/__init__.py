"""One single-step predictor per family; pure tensors in, tensors out."""

from models.predictors.base import SingleStepPredictor
from models.predictors.e2eft import E2EFTPredictor
from models.predictors.lotus import LotusPredictor

__all__ = ["E2EFTPredictor", "LotusPredictor", "SingleStepPredictor"]
