"""binding: attribute binding for text-to-image diffusion, made visible.

The flow, one module per stage::

    analysis    prompt -> spaCy parse -> bindings (modifier words -> noun) -> CLIP token positions
    models      model presets and loading (hub id, local folder, offline shapes and tiny models)
    attention   capture of cross-attention maps during the UNet's forward pass, only where they are read
    losses      SynGen, Divide & Bind and Attend-and-Excite losses on those maps (pure functions)
    methods     the registries: every loss term, every method built from them
    settings    a run's settings, their ranges and defaults, one check for every entry point
    guidance    the denoising loop: vanilla and guided from the same seed
    records     a run as data: images, maps, losses, settings; saved and loaded atomically
    metrics     numbers read off the maps (modifier/noun overlap)
    render      parse SVG, heatmap overlays, plots
    lab         what the app shows, as plain functions

Around it: ``bench`` (cost of each method against its floor; the GPU check), ``architectures`` (SD 1.5 and SD
2.1-base with random weights, for real-scale figures offline), ``evaluation`` (prompt sets, the resumable
grid, metrics, reports), ``shapes`` (a teaching model trained on a world of coloured shapes whose pictures can
be scored exactly) and ``cli`` (``python -m binding``). ``pipelines`` holds what every pipeline shares.
"""

__version__ = "0.1.0"
