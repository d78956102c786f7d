"""Reusable image-fusion building blocks, built on (and never imported by) the metaloss core.

- ``metaloss.fusion.losses``: the fusion loss terms (intensity, Sobel gradient) in the
  TDFusion paper's form and in the released code's form, functional and module forms.
- ``metaloss.fusion.networks``: the ReFusion fusion network, TDFusion's loss generator and a
  loader for the authors' released weights.
- ``metaloss.fusion.bands``: the pieces that run the networks' Restormer blocks in bands of
  rows at inference (the attention's whole-image sums accumulated band by band).
- ``metaloss.fusion.image_io``: images read and written as the reference pipeline does.
- ``metaloss.fusion.metrics``: EN, SF, SCD, VIF, Q^AB/F and SSIM as batched torch functions.
"""

from metaloss.fusion.losses import GradientTerm, IntensityTerm, gradient_loss, intensity_loss, sobel, tdfusion_loss
from metaloss.fusion.networks import LossGenerator, ReFusion, load_released_weights

__all__ = [
    "GradientTerm",
    "IntensityTerm",
    "LossGenerator",
    "ReFusion",
    "gradient_loss",
    "intensity_loss",
    "load_released_weights",
    "sobel",
    "tdfusion_loss",
]
