"""binding: attribute binding for text-to-image diffusion, made visible.

The flow, one module per stage::

    analysis   prompt -> spaCy parse -> bindings (modifier words -> noun) -> CLIP token positions
    models     model presets and loading (hub id, local folder, offline tiny model)
    attention  capture of cross-attention maps during the UNet's forward pass
    losses     SynGen, Divide & Bind and Attend-and-Excite losses on those maps (pure functions)
    guidance   the denoising loop: vanilla and guided from the same seed
    records    a run as data: images, maps, losses, settings; saved and loaded atomically
    render     parse SVG, heatmap overlays, plots
"""

__version__ = "0.1.0"
