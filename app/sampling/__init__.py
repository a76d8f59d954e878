"""Pure tensor math of DDIM/DDPM sampling: no I/O, no threads, no global state."""

from app.sampling.noise import draw, sample_generators
from app.sampling.schedules import (
    SPACINGS,
    ScheduleError,
    alpha_at,
    alphas_cumprod_from_config,
    betas_from_config,
    timestep_sequence,
)
from app.sampling.step import (
    PREDICTION_TYPES,
    StepOutput,
    ddim_sigma,
    ddim_step,
    generalized_step,
    invert_step,
    lerp,
    predict_x0_eps,
    prediction_codes,
    slerp,
    step_sigmas,
)

__all__ = [
    "PREDICTION_TYPES", "SPACINGS", "ScheduleError", "StepOutput", "alpha_at", "alphas_cumprod_from_config",
    "betas_from_config", "ddim_sigma", "ddim_step", "draw", "generalized_step", "invert_step", "lerp",
    "predict_x0_eps", "prediction_codes", "sample_generators", "slerp", "step_sigmas", "timestep_sequence",
]
