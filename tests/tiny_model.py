"""A tiny causal LM (2-layer Llama, 64 hidden, ~512-token BPE vocabulary) for tests and quick benchmarks.

It is built from a config in well under a second, with a ChatML chat template like SmolLM2's, and saved as an
ordinary safetensors folder, so every loading path (`--model FOLDER`) is the real one. Random weights: its
answers are noise, which is all a unit test of the plumbing needs."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """The derivative of x squared is two x. Heapsort runs in O(n log n) time in the worst case.
Newton's second law says force equals mass times acceleration. A prime number has exactly two divisors.
Question: What is 2 + 2? Answer: 4. Choices: A. 3 B. 4 C. 5 D. 6. The answer is B.
Gradient descent updates parameters against the gradient of the loss. Entropy measures uncertainty.
The mitochondria is the powerhouse of the cell. Water boils at 100 degrees Celsius at sea level.
Photosynthesis converts light into chemical energy. def f(x): return x * 2  # code $x^2 + y^2 = z^2$
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -5 1/2 \\frac{1}{2} \\sqrt{2} \\boxed{42} #### 18
"""


def build_tiny_model(folder: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder
