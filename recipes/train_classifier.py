"""Sequence classification of Wikipedia leads by topic (the fine-tuning case) from a YAML recipe.

    accelerate launch recipes/train_classifier.py recipes/configs/classifier_tiny_residual.yaml [--key value ...]

With `model_name_or_path` (e.g. the `final/` folder of a train_clm run) the low-rank layers are
residual adapters over the frozen pretrained weights; accuracy and macro F1 come from the metric
scripts shipped in hf_lowrank/metrics (the Hub's cannot be fetched offline).
"""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--task", "classification"]))
