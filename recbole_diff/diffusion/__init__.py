"""The shared diffusion core used by every recbole-diff method."""

from recbole_diff.diffusion.embedding import StepEmbedding, timestep_embedding
from recbole_diff.diffusion.gaussian import OFFSET_MODES, GaussianDiffusion, StepOptions, make_noise, spaced_steps
from recbole_diff.diffusion.guidance import ClassifierGuidance, classifier_free
from recbole_diff.diffusion.resample import LossAwareSampler, UniformSampler, make_step_sampler
from recbole_diff.diffusion.schedules import SCHEDULES, make_betas

__all__ = [
    "GaussianDiffusion",
    "StepOptions",
    "make_noise",
    "spaced_steps",
    "OFFSET_MODES",
    "StepEmbedding",
    "timestep_embedding",
    "ClassifierGuidance",
    "classifier_free",
    "LossAwareSampler",
    "UniformSampler",
    "make_step_sampler",
    "SCHEDULES",
    "make_betas",
]
