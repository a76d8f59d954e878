"""The model store: diffusers-layout folders -> eps-networks on a device. Knows nothing of HTTP."""

from app.models.kinds import ModelStoreError, UnsupportedModel, check_folder, supported
from app.models.store import DTYPES, LoadedModel, discover, load_model, pick_device

__all__ = ["DTYPES", "LoadedModel", "ModelStoreError", "UnsupportedModel", "check_folder", "discover", "load_model",
           "pick_device", "supported"]
