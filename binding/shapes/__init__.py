"""The teaching model and its world, stage by stage: the procedural world with exact ground truth (``world``),
the scorer that reads a picture back (``scorer``), the model's definition, export and loading (``model``),
the supervision the world's masks give (``grounding``), training (``train``), and the check that a model's words
carry the caption (``maps``)."""
