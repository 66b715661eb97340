"""Test helpers: the shipped data files, and tiny random models built from configs, offline.

The fixtures in conftest.py build their models here; `peftlab bench --smoke` loads this module too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from peftlab.prompts.format import Encoded

REPO = Path(__file__).resolve().parents[1]
PUBMEDQA = REPO / "data" / "pubmedqa" / "pqal_trainval.json"
DIALOGSUM = REPO / "data" / "dialogsum" / "dev.jsonl"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    texts = [json.loads(line)["dialogue"] for line in DIALOGSUM.read_text().splitlines()[:100]]
    items = json.loads(PUBMEDQA.read_text())
    texts += [" ".join(v["CONTEXTS"]) + " " + v["QUESTION"] for v in list(items.values())[:100]]
    return texts + ["yes no maybe"] * 10


def build_tokenizer(out: Path, seq2seq: bool = False, vocab_size: int = 600):
    """A tiny byte-level BPE tokenizer trained on the shipped data, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if seq2seq:  # T5-style: the encoder input and the labels end with </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>" if seq2seq else "<|im_end|>")
    if not seq2seq:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_causal(out: Path, tie: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_seq2seq(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(out, seq2seq=True)
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shared_rows(prefix_len: int, n: int = 4, seed: int = 0, vocab: int = 500) -> list[Encoded]:
    """`n` rows of random tokens that open with the same `prefix_len` tokens, each with its own rest and target."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(10, vocab, (prefix_len,), generator=g).tolist()
    rows = []
    for i in range(n):
        own = torch.randint(10, vocab, (5 + 7 * i,), generator=g).tolist()
        rows.append(Encoded(str(i), shared + own, torch.randint(10, vocab, (3 + i,), generator=g).tolist()))
    return rows
