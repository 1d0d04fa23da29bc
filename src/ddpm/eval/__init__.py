"""Sample-quality evaluation: metrics on feature vectors and the networks that produce them.

Importing this package needs only torch and numpy; the Inception weights are read only when an
:class:`InceptionV3Features` is built.
"""

from ddpm.eval.classifier import ClassifierConfig, DigitClassifier, class_histogram, train_classifier
from ddpm.eval.features import FeatureExtractor, InceptionV3Features, weights_fingerprint
from ddpm.eval.metrics import (
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kid,
    mean_log_density,
    mmd_rbf,
    precision_recall,
    sliced_wasserstein,
)

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "FeatureExtractor",
    "InceptionV3Features",
    "class_histogram",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "kid",
    "mean_log_density",
    "mmd_rbf",
    "precision_recall",
    "sliced_wasserstein",
    "train_classifier",
    "weights_fingerprint",
]
