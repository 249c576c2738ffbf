"""Classification metrics (scikit-learn), their mean and spread over seeds, and the Hub `model-index` rows."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
METRIC_TITLES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "auroc": "AUROC",
}


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 over all classes, and AUROC when there are two classes.

    `probabilities` is (N, num_classes); the prediction is its arg-max. AUROC needs both classes
    among `labels` and is left out otherwise.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=np.arange(num_classes), average="macro", zero_division=0)),
    }
    if num_classes == 2 and len(np.unique(labels)) == 2:
        metrics["auroc"] = float(roc_auc_score(labels, probabilities[:, 1]))
    return metrics


def confusion(labels: np.ndarray, probabilities: np.ndarray) -> list[list[int]]:
    """Confusion matrix, rows true classes and columns predicted classes."""
    probabilities = np.asarray(probabilities)
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), labels=np.arange(probabilities.shape[1]))
    return matrix.tolist()


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (0 for a single run) of every metric present in all runs."""
    names = [name for name in METRIC_NAMES if all(name in run for run in runs)]
    summary = {}
    for name in names:
        values = np.asarray([run[name] for run in runs], dtype=np.float64)
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "runs": len(values),
        }
    return summary


def evaluation_results(metrics: dict, spread: bool = False) -> list[dict]:
    """Test-split results as rows for the model card's `model-index` (values as fractions in [0, 1]).

    With `spread`, each row also carries the sample `std` over its `runs` (same unit), for the card.
    """
    results = []
    for protocol, outcome in metrics["protocols"].items():
        for metric, value in outcome["summary"]["test"].items():
            results.append({
                "task": "image-classification",
                "dataset": metrics["dataset"],
                "dataset_config": metrics["config"],
                "split": "test",
                "protocol": protocol,
                "metric": metric,
                "value": value["mean"],
                "unit": "fraction",
                **({"std": value["std"], "runs": value["runs"]} if spread else {}),
            })
    return results


def format_percent(summary: dict[str, float]) -> str:
    """`97.58 ± 0.12` for several runs, `97.58` for one."""
    text = f"{100 * summary['mean']:.2f}"
    if summary["runs"] > 1:
        text += f" ± {100 * summary['std']:.2f}"
    return text
