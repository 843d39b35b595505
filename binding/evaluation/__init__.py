"""Evaluation, stage by stage: prompt sets (``prompts``) -> the resumable grid of runs (``runner``) -> each
image's and map's numbers (``metrics``) -> reports with paired intervals (``report``, ``stats``)."""
