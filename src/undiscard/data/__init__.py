"""Datasets.

* :mod:`~undiscard.data.classification`: Fashion-MNIST (IDX files), image folders, tensors.
* :mod:`~undiscard.data.segmentation`: Fashion-MNIST-Seg, a segmentation set made from Fashion-MNIST.
"""
