"""Shared fixtures: tiny random-init models of each supported family, built from configs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# The models here are a few thousand parameters: one thread is faster than two, and much faster
# when other processes share the cores (intra-op threads then spin waiting for each other).
torch.set_num_threads(1)

VOCAB = 96


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    )


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    )


def _bert():
    return transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, pad_token_id=0,
        )
    )


def _opt():
    return transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
    )


def _neox():
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
        )
    )


# The one list of families every matrix runs over: name -> builder.
FAMILIES = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "opt": _opt, "gpt_neox": _neox}
# The Auto class that reloads a saved model of each family.
AUTO_CLASSES = {
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.AutoModelForCausalLM,
    "bert": transformers.AutoModelForMaskedLM,
    "opt": transformers.AutoModelForCausalLM,
    "gpt_neox": transformers.AutoModelForCausalLM,
}
GENERATIVE = [f for f in FAMILIES if f != "bert"]  # BERT's masked-LM head does not generate


def build(family: str):
    """A tiny model of ``family``, seeded and in eval mode (no dropout)."""
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def sample_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    """Deterministic token ids in ``[2, VOCAB)`` (clear of the special ids 0 and 1)."""
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    """The model's logits for ``ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapters(model, seed: int = 2):
    """Give residual adapters non-zero active factors so transitions have something to preserve."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            if layer.mode == "residual":
                layer.B[:, : layer.rank] = torch.randn(layer.out_features, layer.rank, generator=g) * 0.05


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param
