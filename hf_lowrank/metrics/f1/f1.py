"""F1 for multi-class predictions, macro-averaged by default (shipped so it loads offline)."""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score; average='macro' (unweighted mean over classes), 'micro' or 'weighted'.",
            citation="",
            inputs_description="predictions, references: lists of integer class ids; average: str.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro"):
        if average not in ("macro", "micro", "weighted"):
            raise ValueError(f"average={average!r} is not allowed; choose 'macro', 'micro' or 'weighted'.")
        p, r = np.asarray(predictions), np.asarray(references)
        if average == "micro":
            return {"f1": float((p == r).mean()) if len(r) else 0.0}
        labels = np.union1d(p, r)
        scores, support = [], []
        for c in labels:
            tp = float(((p == c) & (r == c)).sum())
            denom = float((p == c).sum() + (r == c).sum())
            scores.append(2 * tp / denom if denom else 0.0)
            support.append(float((r == c).sum()))
        if not scores:
            return {"f1": 0.0}
        weights = np.asarray(support) / max(1.0, sum(support)) if average == "weighted" else None
        return {"f1": float(np.average(scores, weights=weights))}
