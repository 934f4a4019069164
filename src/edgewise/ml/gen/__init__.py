"""Generative models (beta-VAE, class-conditional VAE, DDPM) for anomaly detection, synthesis
and denoising.

Invariant: like the rest of `edgewise.ml`, bundles leave only through `write_bundle`; the
device runs the exported graphs with onnxruntime and never needs torch.
"""

from ._attach import attach_detector
from ._augment import class_folder_name, synthesize
from ._ddpm import DDPM_SCORE_METHODS, DenoiseGraph, DiffusionScoreGraph, SamplerGraph, TinyUNet
from ._model import SCORE_METHODS, ConvVAE, DecoderGraph, ScoreGraph
from ._ood import OOD_KINDS, auroc, make_ood, threshold_for_fpr
from ._train import KINDS, GenConfig, GenResult, image_grid, ort_scores, psnr, train_generative

__all__ = [
    "DDPM_SCORE_METHODS",
    "KINDS",
    "DenoiseGraph",
    "DiffusionScoreGraph",
    "SamplerGraph",
    "TinyUNet",
    "psnr",
    "OOD_KINDS",
    "SCORE_METHODS",
    "ConvVAE",
    "DecoderGraph",
    "GenConfig",
    "GenResult",
    "ScoreGraph",
    "attach_detector",
    "auroc",
    "class_folder_name",
    "image_grid",
    "make_ood",
    "ort_scores",
    "synthesize",
    "threshold_for_fpr",
    "train_generative",
]
