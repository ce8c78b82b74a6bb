"""Training, evaluation and prediction: ``involution train / eval / predict``.

Submodules: :mod:`~involution.train.config` (YAML configs and overrides),
:mod:`~involution.train.data` (samplers and loaders), :mod:`~involution.train.engine`
(the training loop), :mod:`~involution.train.distributed` (ranks, devices, process group),
:mod:`~involution.train.tasks` (classification, detection, segmentation),
:mod:`~involution.train.checkpoint` (crash-safe run files), :mod:`~involution.train.progress`,
:mod:`~involution.train.plots` and :mod:`~involution.train.cli`.
"""
