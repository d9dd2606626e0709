"""ComfyUI adapters: inputs -> one turbo_core call -> outputs. No math here."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
