"""A real server over a store of an unconditional and a class-conditional tiny model, and one headless Chromium,
shared by the playground's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.models.folder import random_model_folder
from harness.server import running_server
from tests.conftest import LINEAR_SCHEDULER, TINY_CLASSES, TINY_UNET, pipeline_configs
from tests.playground.browser import chromium


@pytest.fixture(scope="session")
def playground_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("playground_store")
    random_model_folder(store / "tiny", TINY_UNET, LINEAR_SCHEDULER, seed=0)
    random_model_folder(store / "tiny-cond", {**TINY_UNET, "num_class_embeds": len(TINY_CLASSES) + 1},
                        LINEAR_SCHEDULER, seed=3, class_names=TINY_CLASSES)
    # a folder that cannot load: shown as failed, never offered (issue 24)
    pipeline_configs(store / "unsupported", "KandinskyV22Pipeline",
                     {"unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler")})
    return store


@pytest.fixture(scope="session")
def server(playground_store: Path) -> Iterator[str]:
    with running_server(playground_store, DDIM_DEFAULT_MODEL="tiny") as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver
