"""Build a tiny RANDOMLY INITIALISED vision-language model folder (Qwen2-VL or PaliGemma architecture), offline.

    python scripts/make_tiny_vlm.py --arch qwen2-vl --out runs/tiny-qwen2-vl
    python scripts/make_tiny_vlm.py --arch paligemma --out runs/tiny-paligemma

It exercises the real transformers classes with a 32-wide, 2-layer language model, a 2-layer vision encoder and a
processor (a byte-level BPE tokenizer trained on the synthetic ScienceQA text, plus the architecture's image
processor), so the whole pipeline can run on a laptop CPU in seconds. It has learned nothing: scores it reaches are
what a few training steps on the synthetic set give, not what the real checkpoints would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "scienceqa-synthetic" / "problems.json"

QWEN_SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's template, reduced to what peftlab uses: string or list content, image parts as the vision slot.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def corpus() -> list[str]:
    """Text to train the tokenizer on: the synthetic ScienceQA set and the prompt words around it."""
    texts = ["Question: Context: Options: Answer with the option's letter. The answer is A B C D E none"] * 20
    if CORPUS.exists():
        for p in json.loads(CORPUS.read_text()).values():
            texts += [p["question"], " ".join(p["choices"]), p["solution"], p["lecture"]]
    return texts


def build_tokenizer(specials: list[str], eos: str, bos: str | None = None, vocab_size: int = 600):
    """A byte-level BPE tokenizer as a transformers fast tokenizer (not saved; the processor saves it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, bos_token=bos)


def build_qwen2_vl(out: Path, seed: int = 0, width: int = 32) -> Path:
    """A tiny Qwen2-VL: 4 image tokens for a 64x64 picture (14-pixel patches, 2x2 merge), at most 16.

    `width` is the language model's hidden size (bitsandbytes' CPU 4-bit kernels need a multiple of 64).
    """
    half = width // 4 // 2  # rotary frequency pairs per head (4 heads)
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from peftlab.models.vision_models import image_only

    tok = build_tokenizer(QWEN_SPECIALS, eos="<|im_end|>")
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    # Without a video processor: transformers builds those with torchvision, which a CPU-only torch may lack.
    processor = image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            # the three M-RoPE sections (time, height, width) share the head's frequency pairs 2:3:3, as in Qwen2-VL
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]},
            "pad_token_id": ids["<pad>"], "eos_token_id": ids["<|im_end|>"], "bos_token_id": None,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": width, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_paligemma(out: Path, seed: int = 0, width: int = 32) -> Path:
    """A tiny PaliGemma: SigLIP encoder on 32x32 pictures in 8-pixel patches, so 16 image tokens, Gemma decoder."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = build_tokenizer(PALIGEMMA_SPECIALS, eos="<eos>", bos="<bos>")
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16  # PaliGemma's processor reads how many <image> tokens to write from here
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds <image> and the loc/seg tokens
    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "vision_use_head": False},
        text_config={"model_type": "gemma", "vocab_size": len(tok), "hidden_size": width,
                     "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 1, "head_dim": width // 4,
                     "max_position_embeddings": 2048, "pad_token_id": tok.pad_token_id,
                     "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id},
        image_token_index=processor.image_token_id, vocab_size=len(tok), projection_dim=width, hidden_size=width,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


BUILDERS = {"qwen2-vl": build_qwen2_vl, "paligemma": build_paligemma}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="qwen2-vl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32, help="language model hidden size (64 for QLoRA on CPU)")
    args = parser.parse_args()
    path = BUILDERS[args.arch](args.out, args.seed, args.width)
    print(f"tiny random {args.arch} model and processor in {path}")


if __name__ == "__main__":
    main()
