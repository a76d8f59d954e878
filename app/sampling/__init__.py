"""Pure tensor math of DDIM sampling on Gaussian paths: no I/O, no threads, no global state."""

from app.sampling.noise import draw, sample_generators
from app.sampling.paths import PATH_KINDS, Direction, PathKind, Plan, flow_levels, flow_plan, vp_levels, vp_plan
from app.sampling.schedules import (
    FLOW_SPACINGS,
    SPACINGS,
    ScheduleError,
    Spacing,
    alpha_at,
    alphas_cumprod_from_config,
    betas_from_config,
    check_flow_config,
    flow_sigmas,
    timestep_sequence,
)
from app.sampling.step import (
    PREDICTION_TYPES,
    PredictionType,
    StepCoefficients,
    StepOutput,
    ddim_sigma,
    ddim_step,
    generalized_step,
    guide,
    invert_step,
    lerp,
    predict_x0_eps,
    prediction_codes,
    sigma_eta,
    slerp,
    step_coefficients,
    take_step,
)

__all__ = [
    "FLOW_SPACINGS", "PATH_KINDS", "PREDICTION_TYPES", "SPACINGS", "Direction", "PathKind", "Plan", "PredictionType",
    "ScheduleError", "Spacing", "StepCoefficients", "StepOutput", "alpha_at", "alphas_cumprod_from_config",
    "betas_from_config", "check_flow_config", "ddim_sigma", "ddim_step", "draw", "flow_levels", "flow_plan",
    "flow_sigmas", "generalized_step", "guide", "invert_step", "lerp", "predict_x0_eps", "prediction_codes",
    "sample_generators", "sigma_eta", "slerp", "step_coefficients", "take_step", "timestep_sequence",
    "vp_levels", "vp_plan",
]
