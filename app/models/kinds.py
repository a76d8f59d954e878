"""What the store can load, checked from the configs before any weight is read.

A diffusers folder names its pipeline in model_index.json's _class_name and each component as [library, class];
each component's own config names its class again. check_folder reads those names and refuses, in one line, a
pipeline, component or network class that is not registered here, listing what is. A new model kind registers a
PipelineKind (its pipeline class and the classes each component slot accepts). docs/models.md keeps the same list.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Components a pipeline folder may ship that the server never uses (diffusers' optional parts).
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# Schedulers whose config describes a VP path (betas, prediction type, spacing); sampling is always our stepper.
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "HeunDiscreteScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler")
# every other component keeps a config.json
CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
                "tokenizer_2": "tokenizer_config.json", "tokenizer_3": "tokenizer_config.json"}
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


class ModelStoreError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


class UnsupportedModel(ModelStoreError):
    """A folder of a pipeline, component or network class that this server does not serve."""


@dataclass(frozen=True)
class PipelineKind:
    """A pipeline class the store loads: the classes each component slot accepts (optional slots may be null)."""

    name: str
    components: dict[str, tuple[str, ...]]
    optional: tuple[str, ...] = ()

    def describe(self) -> str:
        """The pipeline and its denoiser, short enough for a one-line refusal (docs/models.md has the rest)."""
        slot, classes = next(iter(self.components.items()))
        return f"{self.name} ({slot}: {' | '.join(classes)})"


KINDS: dict[str, PipelineKind] = {}
FLAT_NETWORKS = ("UNet2DModel",)  # a flat folder (google/ddpm-cifar10-32): one network config beside its weights


def register(kind: PipelineKind) -> PipelineKind:
    KINDS[kind.name] = kind
    return kind


register(PipelineKind("DDPMPipeline", {"unet": ("UNet2DModel",), "scheduler": VP_SCHEDULERS + FLOW_SCHEDULERS}))
# Latent pipelines (app/models/pipelines.py loads them): a denoiser, an AutoencoderKL, and text encoders or classes.
register(PipelineKind("StableDiffusionPipeline", {
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
    "tokenizer": CLIP_TOKENIZERS, "scheduler": VP_SCHEDULERS}))
register(PipelineKind("StableDiffusion3Pipeline", {
    "transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModelWithProjection",), "tokenizer": CLIP_TOKENIZERS,
    "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer_2": CLIP_TOKENIZERS,
    "text_encoder_3": ("T5EncoderModel",), "tokenizer_3": ("T5TokenizerFast", "T5Tokenizer"),
    "scheduler": FLOW_SCHEDULERS}, optional=("text_encoder_3", "tokenizer_3")))
register(PipelineKind("DiTPipeline", {
    "transformer": ("DiTTransformer2DModel",), "vae": ("AutoencoderKL",), "scheduler": VP_SCHEDULERS}))


def supported() -> str:
    """The list quoted by every refusal."""
    kinds = "; ".join(k.describe() for k in KINDS.values())
    return f"{kinds}; flat folders of {' | '.join(FLAT_NETWORKS)} (docs/models.md)"


@dataclass(frozen=True)
class FolderCheck:
    """A folder that passed: its pipeline kind (None: flat), the class of each used component, what is ignored."""

    root: Path
    kind: PipelineKind | None
    classes: dict[str, str]
    ignored: tuple[str, ...] = field(default=())


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelStoreError(f"{path}: missing file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelStoreError(f"{path}: bad JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path}: bad JSON (expected an object)")
    return data


def check_folder(root: Path) -> FolderCheck:
    """The folder's kind from its class names alone; UnsupportedModel (one line, with the supported list) for a
    class not registered, ModelStoreError for a missing or broken config."""
    index_path = root / "model_index.json"
    if not index_path.exists() and not (root / "unet").is_dir():
        return _check_flat(root)
    index = read_json(index_path)
    name = index.get("_class_name")
    kind = KINDS.get(str(name))
    if kind is None:
        raise UnsupportedModel(f"{index_path}: pipeline class {name!r} is not supported; supported: {supported()}")
    classes: dict[str, str] = {}
    ignored = []
    for slot, spec in index.items():
        if slot.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue  # _class_name, _diffusers_version, id2label, requires_safety_checker ...
        cls = spec[1]
        if slot in IGNORED_COMPONENTS or slot not in kind.components:
            if cls is not None:
                ignored.append(slot)
            continue
        if cls is None:
            continue  # checked below, with the slots that are missing
        if cls not in kind.components[slot]:
            raise UnsupportedModel(f"{index_path}: {slot} class {cls!r} is not supported in a {kind.name}; "
                                   f"supported: {_choices(kind.components[slot])}")
        classes[slot] = cls
    for slot, accepted in kind.components.items():
        if slot not in classes:
            if slot in kind.optional:
                continue
            raise ModelStoreError(f"{index_path}: the component {slot!r} is missing; a {kind.name} needs one of "
                                  f"{_choices(accepted)}")
        config = root / slot / CONFIG_FILES.get(slot, "config.json")
        own = read_json(config).get("_class_name")
        if own is not None and own not in accepted:
            raise UnsupportedModel(f"{config}: class {own!r} is not supported as the {slot} of a {kind.name}; "
                                   f"supported: {_choices(accepted)}")
    if ignored:
        log.info("model %s: ignoring the components %s (not used by this server)", root.name, ", ".join(ignored))
    return FolderCheck(root, kind, classes, tuple(ignored))


def _check_flat(root: Path) -> FolderCheck:
    config_path = root / "config.json"
    config = read_json(config_path)
    cls = config.get("_class_name")
    if cls is None and ("architectures" in config or "model_type" in config):
        what = (config.get("architectures") or [config.get("model_type")])[0]
        raise UnsupportedModel(f"{config_path}: a transformers {what!r} config, not a model folder (a component of a "
                               f"pipeline? point the store at the folder holding model_index.json); supported: "
                               f"{supported()}")
    if cls is not None and cls not in FLAT_NETWORKS:
        raise UnsupportedModel(f"{config_path}: network class {cls!r} is not supported in a flat folder; "
                               f"supported: {supported()}")
    return FolderCheck(root, None, {"unet": "UNet2DModel"})


def _choices(classes: tuple[str, ...]) -> str:
    return ", ".join(classes)


def check_store(store: Path) -> None:
    """A store must be a folder of model folders, not a model folder itself."""
    if not store.is_dir():
        raise ModelStoreError(f"{store}: model store folder does not exist")
    if (store / "model_index.json").is_file():
        raise ModelStoreError(f"{store} is itself a model folder (it holds model_index.json); point the model store "
                              "at the folder above it, which holds one folder per model")
