"""Accuracy: the fraction of predictions equal to the references (shipped so it loads offline)."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions, references: lists of integer class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        if r.size == 0:
            raise ValueError("accuracy needs at least one prediction.")
        return {"accuracy": float((p == r).mean())}
