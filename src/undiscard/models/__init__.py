"""Loading, saving and training models.

* :mod:`~undiscard.models.classifiers`: :func:`load_model` / :func:`save_checkpoint` (timm, torchvision,
  transformers, the project's zoo, safetensors checkpoints).
* :mod:`~undiscard.models.segmenters`: segmentation models (torchvision, smp, transformers, the zoo's own).
* :mod:`~undiscard.models.archs`: the zoo's small architectures (``zoo:NAME``).
* :mod:`~undiscard.models.train_classifier`: the seeded, resumable Fashion-MNIST classifier recipe.
* :mod:`~undiscard.models.train_segmenter`: the same for the segmentation zoo.
"""

from undiscard.models.classifiers import LoadedModel, load_model, save_checkpoint
from undiscard.models.segmenters import LoadedSegmenter, load_segmenter

__all__ = ["LoadedModel", "load_model", "save_checkpoint", "LoadedSegmenter", "load_segmenter"]
