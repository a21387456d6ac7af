"""The LoRA lab: a local page that shows what rank, alpha, scale and blocks do to the images and to ΔW, live.

    python -m lab --ckpt toy/tiny_sd.safetensors --lora runs/toy_lora/lora_final.safetensors   # then open the URL

    import lab
    state = lab.open_lab("toy/tiny_sd.safetensors", ["runs/toy_lora/lora_final.safetensors"])
    images = lab.render(state, lab.Settings(prompt="a purple circle", rank=1))   # [(Column, uint8 [N, H, W, 3])]

rank.py holds the math (ΔW cut to rank k by its SVD), state.py the model and the adapters' SVDs, render.py the
weights and images at the page's settings, panels.py the spectrum and norms, server.py the HTTP endpoints,
static/index.html the page, chromium.py a headless Chromium driver for the tests and the screenshot.
"""

import devices  # noqa: F401  first: it sets OpenMP's wait policy, which only counts before torch loads

from .panels import spectrum_panel
from .rank import best_rank_k, energy_kept, update_svd
from .render import Column, apply, column_label, columns, layer_delta, render
from .server import make_server
from .settings import Settings, SettingsError, parse_settings
from .state import Adapter, Lab, LayerUpdate, open_lab

__all__ = ["Adapter", "Column", "Lab", "LayerUpdate", "Settings", "SettingsError", "apply", "best_rank_k", "column_label",
           "columns", "energy_kept", "layer_delta", "make_server", "open_lab", "parse_settings", "render",
           "spectrum_panel", "update_svd"]
