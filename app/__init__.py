"""ddim-serve: serve pretrained diffusion eps-models with DDIM and DDPM sampling."""

__version__ = "0.1.0"
