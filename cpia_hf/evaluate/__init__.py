"""Downstream evaluation of image encoders: kNN, linear probe and fine-tuning on a labelled dataset."""
from .data import LabelledData, LabelledSplit, load_labelled_data
from .features import encoder_fingerprint, extract_features
from .metrics import classification_metrics, evaluation_results, summarize
from .models import Encoder, Preprocessing, load_encoder
from .protocols import FinetuneSettings, KnnSettings, LinearSettings, finetune, knn, linear_probe

__all__ = [
    "Encoder",
    "FinetuneSettings",
    "KnnSettings",
    "LabelledData",
    "LabelledSplit",
    "LinearSettings",
    "Preprocessing",
    "classification_metrics",
    "encoder_fingerprint",
    "evaluation_results",
    "extract_features",
    "finetune",
    "knn",
    "linear_probe",
    "load_encoder",
    "load_labelled_data",
    "summarize",
]
