"""ComfyUI-TurboDiffusion: TurboWan video generation nodes.

ComfyUI imports this at start-up, so it stays cheap: no torch work here. The
node modules import turbo_core (and torch) only when a node runs.
"""
if __package__:  # as ComfyUI imports it. pytest imports this file on its own (no package) when the
    # checkout's folder is not a module name (mktemp's "tmp.XXXX"): there is nothing to register then
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
