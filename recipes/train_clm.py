"""Causal language modelling with low-rank layers, from a YAML recipe config.

    accelerate launch recipes/train_clm.py recipes/configs/gpt2_tiny_inrank.yaml [--key value ...]
    python recipes/train_clm.py recipes/configs/quickstart.yaml --max_steps 50 --lowrank.strategy_args.threshold 0.8

The configs in recipes/configs/ say in their first lines the hardware they ran on and the
result they gave. The run: load the corpus and train (or reload) a byte-level BPE tokenizer;
build the model (GPT-2 or Llama from the size options, or `model_name_or_path`); wrap it with
the `lowrank:` settings; train with LowRankTrainer; evaluate (perplexity = exp(eval loss));
with `compare_full_rank: true` train the same model dense; print the result block and write
<output_dir>/results.json and <output_dir>/final (the trimmed low-rank model).
`hf-lowrank train CONFIG` runs the same code (hf_lowrank/recipe.py).
"""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], task="clm"))
