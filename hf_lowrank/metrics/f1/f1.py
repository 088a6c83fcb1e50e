"""F1 for multi-class predictions, macro-averaged by default (shipped so it loads offline)."""

import datasets
import evaluate
import numpy as np

AVERAGES = ("macro", "micro", "weighted", "binary")


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "F1 score. average='macro': unweighted mean of the per-class F1 over the classes seen in "
                "predictions or references; 'weighted': mean weighted by class support; 'micro': F1 of "
                "all decisions pooled (equals accuracy for single-label data); 'binary': F1 of pos_label."
            ),
            citation="",
            inputs_description="predictions, references: lists of integer class ids; average: str; pos_label: int.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        if average not in AVERAGES:
            raise ValueError(f"average={average!r} is not allowed; choose one of {AVERAGES}.")
        p, r = np.asarray(predictions), np.asarray(references)
        if r.size == 0:
            raise ValueError("f1 needs at least one prediction.")
        if average == "micro":
            return {"f1": float((p == r).mean())}
        labels = np.array([pos_label]) if average == "binary" else np.union1d(p, r)
        true_pos = ((p[:, None] == labels) & (r[:, None] == labels)).sum(0)
        predicted, support = (p[:, None] == labels).sum(0), (r[:, None] == labels).sum(0)
        denom = predicted + support
        f1 = np.divide(2 * true_pos, denom, out=np.zeros(len(labels)), where=denom > 0)
        return {"f1": float(np.average(f1, weights=support if average == "weighted" else None))}
