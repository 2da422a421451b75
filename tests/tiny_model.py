"""A tiny random Llama with a real byte-level BPE tokenizer and a ChatML chat template.

Built in well under a second, saved as an ordinary checkpoint folder, so tests exercise the real
loading code (AutoModel/AutoTokenizer from a local path) without any download.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The cat sat on the mat. The dog ran in the park.",
    "Jupiter is the largest planet in our solar system.",
    "Keep a regular schedule and go to bed at the same time every day.",
    "Rewrite the sentence in the passive voice. Summarise in one sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "List three benefits of exercise: it strengthens the heart, improves mood and helps sleep.",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' \" ( ) - + = / * %",
]


def tiny_llama_config(tokenizer, **settings):
    """The tiny Llama's shape (hidden 32, 2 layers, 4 heads, 2 KV heads) for `tokenizer`, plus `settings`."""
    from transformers import LlamaConfig

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    return LlamaConfig(
        vocab_size=len(tokenizer), num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, **shape, **settings
    )


def build_tiny_model(folder: Path, *, seed: int = 0, vocab_size: int = 400, words: list[str] | None = None) -> Path:
    """With `words`, the tokenizer is word-level over just those words (for learning tests where random
    outputs must hit reference words often enough to give a reward signal)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if words:
        vocab = {token: i for i, token in enumerate(specials + sorted(set(words)))}
        bpe = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        bpe.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = tiny_llama_config(
        tokenizer,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # At the default init (std 0.02) the tied output embeddings are so small that even a perfectly
        # aligned final hidden state gives logits within about +-0.6: no distribution can become peaked.
        # Real models have no such limit; scale up so a LoRA can actually learn to prefer tokens.
        model.get_input_embeddings().weight.mul_(6.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_lora_adapter(model_folder: Path, adapter_folder: Path, *, seed: int = 1, scale: float = 0.5) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, saved the way `train` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder)
    torch.manual_seed(seed)  # LoRA A is drawn from the global generator: the same adapter whatever ran before
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter change the outputs
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(adapter_folder, safe_serialization=True)
    return adapter_folder
