"""Analyses of trained runs from the ACT paper (sections 4.6-4.8) and the run-folder reader.

- :mod:`~actrain.analysis.norms`: Frobenius norm of every learnable conv/linear weight (Fig. 3 left)
- :mod:`~actrain.analysis.compression`: random-label probe on frozen features (Fig. 3 right)
- :mod:`~actrain.analysis.entropy`: mean posterior entropy over the training set (Fig. 4)
- :mod:`~actrain.analysis.runs`: reading run folders, their metrics and evaluation JSON
- :mod:`~actrain.analysis.analyze`: all three analyses of one run, saved as ``analysis.json``
"""

from actrain.analysis.compression import random_label_probe, random_labels
from actrain.analysis.entropy import mean_entropy, softmax_entropy
from actrain.analysis.norms import weight_norms

__all__ = [
    "mean_entropy",
    "random_label_probe",
    "random_labels",
    "softmax_entropy",
    "weight_norms",
]
