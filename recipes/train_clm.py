"""Causal language modelling from a YAML recipe (GPT-2 or Llama, from scratch or a local checkpoint).

    accelerate launch recipes/train_clm.py recipes/configs/gpt2_tiny_inrank.yaml [--key value ...]

Runs the same code as `hf-lowrank train`; prints eval perplexity, parameters and final ranks,
and writes <output_dir>/results.json and <output_dir>/final (the trimmed low-rank model).
"""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--task", "clm"]))
