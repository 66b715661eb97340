"""Vision-language models: tiny random Qwen2-VL and PaliGemma, built from configs with a real processor, offline.

They load with their processor, write image slots into chat or plain prompts, really see the image, score the same
alone or in any batch, train with every supported method, reload to the same validation loss, and refuse the
pairs peft cannot run."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from builders import REPO
from trainkit import adapt, tiny_cfg, train_losses

from peftlab.core.config import MethodConfig
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.core.files import read_json
from peftlab.data.splits import load_splits
from peftlab.data.tasks import get_task
from peftlab.evaluate.scoring import mean_loss
from peftlab.models.adapters import load_for_inference
from peftlab.models.forward import target_logits
from peftlab.models.loading import load_model
from peftlab.models.vision_models import ARCHS, vision_part
from peftlab.prompts.batches import collate
from peftlab.prompts.encoding import encode, encode_split, format_for
from peftlab.prompts.vision_prompts import VisionPromptFormat
from peftlab.recipes.train_run import run_training

SYNTH = REPO / "data" / "scienceqa-synthetic" / "problems.json"
METHODS = ["lora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning", "full"]
MODEL_TYPE = {"qwen2-vl": "qwen2_vl", "paligemma": "paligemma"}
IMAGE_TOKENS = {"qwen2-vl": 4, "paligemma": 16}  # 64x64 pictures: 2x2 merged 14-px patches; 32x32 in 8-px patches
SUPPORTED = [(a, m) for a in MODEL_TYPE for m in METHODS if m not in ARCHS[MODEL_TYPE[a]].refuses]
REFUSED = [(a, m) for a in MODEL_TYPE for m in METHODS if m in ARCHS[MODEL_TYPE[a]].refuses]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory) -> dict:
    builders = _script("make_tiny_vlm").BUILDERS
    return {arch: builders[arch](tmp_path_factory.mktemp(arch)) for arch in MODEL_TYPE}


@pytest.fixture(scope="module")
def examples():
    by_kind = {}
    for ex in get_task("scienceqa").load(SYNTH):
        by_kind.setdefault("image" if ex.image else "text", []).append(ex)
    return by_kind


def _loaded(tiny_vlms, arch):
    loaded = load_model(str(tiny_vlms[arch]), device="cpu")
    return loaded, format_for(loaded)


@pytest.mark.parametrize("arch", MODEL_TYPE)
def test_loads_with_processor_and_image_slots(arch, tiny_vlms, examples):
    loaded, fmt = _loaded(tiny_vlms, arch)
    assert loaded.processor is not None and loaded.kind == "causal" and isinstance(fmt, VisionPromptFormat)
    task = get_task("scienceqa")
    with_image = encode(task, examples["image"][0], fmt, 256)
    text_only = encode(task, examples["text"][0], fmt, 256)
    image_id = fmt.image_token_id
    assert with_image.prompt_ids.count(image_id) == IMAGE_TOKENS[arch] and "pixel_values" in with_image.media.tensors
    assert image_id not in text_only.prompt_ids and text_only.media.tensors == {}
    if arch == "qwen2-vl":  # a chat model: the image slot sits in the user turn of the chat template
        assert loaded.chat
        assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Question:" in fmt.prompt_text(
            "Question: x", image=True)
    else:  # PaliGemma's prefix layout: image tokens, <bos>, the prompt, a newline; the same without an image
        assert not loaded.chat
        decoded = loaded.tokenizer.decode(text_only.prompt_ids)
        assert decoded.startswith("<bos>Question:") and decoded.endswith("\n")


def _logits(model, items):
    batch = collate(items, "causal", 0)
    with torch.inference_mode():
        return target_logits(model.eval(), "causal", batch).float()


@pytest.mark.parametrize("arch", MODEL_TYPE)
def test_the_image_reaches_the_model(arch, tiny_vlms, examples):
    loaded, fmt = _loaded(tiny_vlms, arch)
    task = get_task("scienceqa")
    ex = examples["image"][0]
    other = dataclasses.replace(ex, image=examples["image"][1].image)  # same text, another picture
    a, b = (encode(task, e, fmt, 256) for e in (ex, other))
    assert a.prompt_ids == b.prompt_ids
    assert torch.equal(_logits(loaded.model, [a]), _logits(loaded.model, [a]))
    assert not torch.allclose(_logits(loaded.model, [a]), _logits(loaded.model, [b]), atol=1e-4)


@pytest.mark.parametrize("arch", MODEL_TYPE)
def test_scores_do_not_depend_on_batch_mates(arch, tiny_vlms, examples):
    """Left padding, a text-only row and another image in the batch leave a row's logits unchanged."""
    loaded, fmt = _loaded(tiny_vlms, arch)
    task = get_task("scienceqa")
    row = encode(task, examples["image"][2], fmt, 256)
    mates = [encode(task, e, fmt, 256) for e in (examples["text"][0], examples["image"][3])]
    mates[0] = dataclasses.replace(mates[0], prompt_ids=mates[0].prompt_ids * 2)  # longer: `row` gets left padding
    alone = _logits(loaded.model, [row])
    batched = _logits(loaded.model, [mates[0], row, mates[1]])[1:2, : alone.shape[1]]
    assert torch.allclose(alone, batched, atol=1e-5), (alone - batched).abs().max()


def _cfg(tiny_vlms, arch, method, tmp_path, *extra):
    return tiny_cfg(tiny_vlms[arch], method, tmp_path, None, SYNTH, "data.task=scienceqa", "data.max_length=256",
                    "method.num_virtual_tokens=4", *extra)


# Learning rates that move a random 2-layer model visibly in 2 steps.
LR = {"lora": 5e-2, "ia3": 3e-1, "prompt-tuning": 3e-1, "prefix-tuning": 3e-1, "p-tuning": 3e-2, "full": 3e-3}


@pytest.mark.parametrize("arch,method", SUPPORTED)
def test_trains_and_reloads(arch, method, tiny_vlms, tmp_path):
    # No LoRA dropout: the val loss of the training loop is measured in train mode, the reload's in eval mode.
    cfg = _cfg(tiny_vlms, arch, method, tmp_path, f"train.lr={LR[method]}", "method.dropout=0")
    run_dir = run_training(cfg)
    result = read_json(run_dir / "result.json")
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert 0 < result["trainable_params"] < result["total_params"] and result["adapter_bytes"] > 0
    assert "test_accuracy_image" in read_json(run_dir / "metrics.json")
    # The saved adapter (or model folder) reproduces the validation loss of the weights it was saved from.
    task = get_task("scienceqa")
    loaded, _ = load_for_inference(str(tiny_vlms[arch]), str(run_dir), device="cpu")
    fmt = format_for(loaded)
    val = encode_split(cfg.data, task, fmt, load_splits(cfg.data, task)["val"])
    reloaded = mean_loss(loaded.model, "causal", val, loaded.tokenizer.pad_token_id)
    assert reloaded == pytest.approx(result["best_val_loss"], abs=1e-5)
    base, _ = _loaded(tiny_vlms, arch)
    assert abs(mean_loss(base.model, "causal", val, base.tokenizer.pad_token_id) - reloaded) > 1e-4  # it trained


@pytest.mark.parametrize("arch,method", REFUSED)
def test_unsupported_pairs_are_refused_with_the_reason(arch, method, tiny_vlms, tmp_path):
    with pytest.raises(NotSupported, match=rf"method '{method}' is not supported on .*docs/vision.md"):
        run_training(_cfg(tiny_vlms, arch, method, tmp_path))


def _adapted(model) -> set[str]:
    """The parts holding trainable weights."""
    return {vision_part(n) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", MODEL_TYPE)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_language_side_by_default_vision_parts_on_request(arch, method, tiny_vlms):
    task = get_task("scienceqa")
    for vision, parts in (([], {"language"}), (["projector"], {"language", "projector"}),
                          (["tower", "projector"], {"language", "projector", "tower"})):
        loaded, _ = _loaded(tiny_vlms, arch)
        model = adapt(loaded, task, MethodConfig(name=method, vision=vision))
        assert _adapted(model) == parts, vision
    loaded, _ = _loaded(tiny_vlms, arch)
    with pytest.raises(PeftlabError, match="method.vision: unknown part"):
        adapt(loaded, task, MethodConfig(name=method, vision=["eyes"]))


def test_prompt_learning_cannot_adapt_vision_parts(tiny_vlms):
    loaded, _ = _loaded(tiny_vlms, "paligemma")
    with pytest.raises(PeftlabError, match="needs lora, qlora, ia3 or full"):
        adapt(loaded, get_task("scienceqa"), MethodConfig(name="prompt-tuning", vision=["projector"]))


@pytest.mark.parametrize("arch", MODEL_TYPE)
def test_merged_lora_matches_the_adapter(arch, tiny_vlms, tmp_path, examples):
    from peftlab.deploy.export import merge_run

    run_dir = run_training(_cfg(tiny_vlms, arch, "lora", tmp_path, "train.lr=5e-2"))
    merged = load_model(str(merge_run(run_dir, tmp_path / "merged")), device="cpu")
    adapted, _ = load_for_inference(str(tiny_vlms[arch]), str(run_dir), device="cpu")
    assert merged.processor is not None
    fmt = format_for(merged)
    items = [encode(get_task("scienceqa"), e, fmt, 256) for e in (examples["image"][0], examples["text"][0])]
    assert torch.allclose(_logits(merged.model, items), _logits(adapted.model, items), atol=1e-4)


@pytest.mark.parametrize("arch,method", [("qwen2-vl", "zero-shot"), ("paligemma", "zero-shot"),
                                         ("paligemma", "prompt-tuning"), ("paligemma", "prefix-tuning")])
def test_generation_agrees_with_scoring(arch, method, tiny_vlms, examples):
    """Greedy generation in a padded batch picks, token by token, what teacher-forced scoring ranks first: the
    positions, token types and images of the generation path are those of the training and scoring path."""
    from peftlab.evaluate.generation import _media

    loaded, fmt = _loaded(tiny_vlms, arch)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy outputs vary from token to token
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model = adapt(loaded, get_task("scienceqa"), MethodConfig(name=method, num_virtual_tokens=4)).eval()
    items = [encode(get_task("scienceqa"), e, fmt, 256) for e in (examples["image"][5], examples["text"][3],
                                                                   examples["image"][9])]
    width = max(len(e.prompt_ids) for e in items)
    ids, mask = torch.zeros((3, width), dtype=torch.long), torch.zeros((3, width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, width - len(e.prompt_ids):], mask[row, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids), 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **_media(model, items, ids, width), max_new_tokens=3,
                             do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    generated = out[:, -3:]
    assert len(set(generated.flatten().tolist())) > 1
    for row, e in enumerate(items):
        forced = dataclasses.replace(e, target_ids=[*generated[row].tolist(), 0])
        assert _logits(model, [forced])[0, :3].argmax(-1).tolist() == generated[row].tolist(), row


@pytest.fixture(scope="session")
def tiny_vlms_64(tmp_path_factory) -> dict:
    """64 wide: bitsandbytes' CPU 4-bit kernels pack layer inputs in blocks of 64 features."""
    builders = _script("make_tiny_vlm").BUILDERS
    return {arch: builders[arch](tmp_path_factory.mktemp(f"{arch}-64"), 0, 64) for arch in MODEL_TYPE}


@pytest.mark.parametrize("arch", MODEL_TYPE)
def test_qlora_quantizes_the_language_side(arch, tiny_vlms_64, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'peftlab[qlora]'")
    import peftlab.recipes.train_run as train_mod
    from peftlab.models.quant import check_available

    try:
        check_available(torch.device("cpu"))
    except NotSupported as err:
        pytest.skip(str(err))
    seen = {}
    original = train_mod.count_params

    def recording(model):
        seen.update({n: type(m).__name__ for n, m in model.named_modules()})
        return original(model)

    monkeypatch.setattr(train_mod, "count_params", recording)
    run_dir = run_training(_cfg(tiny_vlms_64, arch, "qlora", tmp_path))
    assert len(train_losses(run_dir)) == 2 and read_json(run_dir / "result.json")["adapter_bytes"] > 0
    quantized = {vision_part(n) for n, kind in seen.items() if kind == "Linear4bit"}
    assert quantized == {"language"}  # the vision encoder and projector stay in full precision
