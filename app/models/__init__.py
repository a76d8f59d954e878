"""The model store: diffusers-layout folders -> eps-networks on a device. Knows nothing of HTTP."""

from app.models.store import DTYPES, LoadedModel, ModelStoreError, discover, load_model, pick_device

__all__ = ["DTYPES", "LoadedModel", "ModelStoreError", "discover", "load_model", "pick_device"]
