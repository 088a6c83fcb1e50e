"""Sequence classification of Wikipedia leads by topic, the fine-tuning case, from a YAML recipe config.

    accelerate launch recipes/train_classifier.py recipes/configs/classifier_tiny_residual.yaml [--key value ...]
    python recipes/train_classifier.py recipes/configs/classifier_tiny_residual.yaml --model_name_or_path runs/gpt2_tiny_full/final

`model_name_or_path` is the pretrained model: the final/ folder of a train_clm run (merged to
dense, its tokenizer reused) or any saved transformers model; without it the model is built
from scratch. The low-rank layers are residual adapters `W0 + s B A` over the frozen weights
(`mode: residual`): only the adapters and the classification head train, as with PEFT. Accuracy and
macro F1 come from the `evaluate` metric scripts shipped in hf_lowrank/metrics (loaded by
path: nothing is fetched from the Hub). `hf-lowrank train CONFIG` runs the same code.
"""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], task="classification"))
