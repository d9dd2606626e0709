"""ComfyUI-TurboDiffusion: TurboWan video generation nodes.

ComfyUI imports this at start-up, so it stays cheap: no torch work here. The
node modules import turbo_core (and torch) only when a node runs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
