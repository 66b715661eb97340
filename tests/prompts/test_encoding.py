"""From examples to tokens: truncation cuts only the context, the loss covers only the target, token batching."""

from __future__ import annotations

import pytest
from builders import PUBMEDQA

from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import get_task
from peftlab.models.forward import IGNORE
from peftlab.models.hf_folder import load_tokenizer
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import encode, few_shot_demos
from peftlab.prompts.format import Encoded, PromptFormat


@pytest.fixture(scope="module")
def pubmedqa_examples():
    return get_task("pubmedqa").load(PUBMEDQA)[:20]


def _fmt(path, kind):
    tok = load_tokenizer(path)
    return PromptFormat(tok, kind, chat=kind == "causal")


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_truncation_cuts_only_the_context(kind, tiny_causal, tiny_seq2seq, pubmedqa_examples):
    fmt = _fmt(tiny_causal if kind == "causal" else tiny_seq2seq, kind)
    task = get_task("pubmedqa")
    ex = max(pubmedqa_examples, key=lambda e: len(e.inputs["context"]))
    full = encode(task, ex, fmt, max_length=100_000)
    assert full.truncated == 0
    cut = encode(task, ex, fmt, max_length=full.length // 2)
    assert cut.truncated > 0
    assert cut.length <= full.length // 2
    prompt = fmt.tokenizer.decode(cut.prompt_ids)
    assert ex.inputs["question"] in prompt  # the question survives whole
    assert task.templates[0].instruction in prompt
    assert ex.inputs["context"] not in prompt and ex.inputs["context"][:40] in prompt  # the context is cut at its end
    assert cut.target_ids == full.target_ids == fmt.target_ids(ex.target)  # the target is never cut


def test_truncation_that_cannot_fit_is_an_error(tiny_causal, pubmedqa_examples):
    fmt = _fmt(tiny_causal, "causal")
    with pytest.raises(PeftlabError, match="max_length 5"):
        encode(get_task("pubmedqa"), pubmedqa_examples[0], fmt, max_length=5)


def test_causal_target_ends_the_turn(tiny_causal):
    fmt = _fmt(tiny_causal, "causal")
    assert fmt.end_of_turn == "<|im_end|>"
    assert fmt.tokenizer.decode(fmt.target_ids("yes")) == "yes<|im_end|>"
    assert fmt.tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_token_ids
    assert fmt.prompt_text("hi").endswith("<|im_start|>assistant\n")


def _items(lengths, target_len=3):
    return [Encoded(str(i), list(range(1, n + 1)), list(range(100, 100 + target_len))) for i, n in enumerate(lengths)]


def test_collate_causal_loss_only_on_target():
    items = [Encoded("a", [5, 6, 7], [20, 21]), Encoded("b", [8], [30, 31, 32])]
    batch = collate(items, "causal", pad_id=0)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert labels.shape == (2, 3)
    for row, e in enumerate(items):
        assert labels[row][labels[row] != IGNORE].tolist() == e.target_ids
        assert (labels[row] == IGNORE).sum() == 3 - len(e.target_ids)
    # prompts end at the same column; the input at column p_len - 1 + k predicts target token k
    p_len = 3
    assert ids[0].tolist() == [5, 6, 7, 20, 0] and ids[1].tolist() == [0, 0, 8, 30, 31]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["position_ids"][1, p_len - 1 :].tolist() == [0, 1, 2]
    for row, e in enumerate(items):
        for k in range(1, len(e.target_ids)):
            assert ids[row, p_len - 1 + k] == e.target_ids[k - 1]


def test_collate_causal_right_layout():
    items = [Encoded("a", [5, 6, 7], [20, 21]), Encoded("b", [8], [30, 31, 32])]
    batch = collate(items, "causal", pad_id=0, right_padded=True)
    assert set(batch) == {"input_ids", "labels", "label_positions"}  # no mask: pads only follow real tokens
    assert batch["input_ids"].tolist() == [[5, 6, 7, 20], [8, 30, 31, 0]]
    assert batch["labels"].tolist() == [[20, 21, IGNORE], [30, 31, 32]]
    # the input at label_positions[r, k] is the token just before target token k
    assert batch["label_positions"].tolist() == [[2, 3, 3], [0, 1, 2]]
    for row, e in enumerate(items):
        sequence = e.prompt_ids + e.target_ids
        for k in range(len(e.target_ids)):
            assert batch["input_ids"][row, batch["label_positions"][row, k]] == sequence[len(e.prompt_ids) - 1 + k]


def test_collate_seq2seq_layout():
    items = [Encoded("a", [5, 6, 7], [20, 1]), Encoded("b", [8], [30, 31, 1])]
    batch = collate(items, "seq2seq", pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[20, 1, IGNORE], [30, 31, 1]]


def test_token_batches_respect_limits():
    lengths = [5, 50, 7, 33, 12, 90, 3, 64, 18, 27, 41, 9, 70, 11, 25, 6]
    items = _items(lengths, target_len=2)
    batches = token_batches(items, max_tokens=120, max_rows=3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(items[i].length for i in b) * len(b) <= 120


def test_token_batches_single_long_item_gets_own_batch():
    items = _items([500, 4, 4])
    batches = token_batches(items, max_tokens=100, max_rows=8)
    assert [0] in batches


def test_token_batches_order_depends_on_seed_only():
    items = _items([(i * 37) % 60 + 4 for i in range(64)])
    a, b, c = (token_batches(items, 200, 4, seed=s) for s in (0, 0, 1))
    assert a == b
    assert a != c
    unseeded = token_batches(items, 200, 4)
    assert unseeded == token_batches(items, 200, 4)


def test_few_shot_demos_are_seeded(pubmedqa_examples):
    task = get_task("pubmedqa")
    a = few_shot_demos(task, pubmedqa_examples, 3, seed=0)
    assert a == few_shot_demos(task, pubmedqa_examples, 3, seed=0)
    assert len(a) == 3 and all(answer in task.labels for _, answer in a)
    with pytest.raises(PeftlabError, match="--shots 50"):
        few_shot_demos(task, pubmedqa_examples, 50, seed=0)


def test_encoded_shots_appear_in_prompt(tiny_causal, pubmedqa_examples):
    fmt = _fmt(tiny_causal, "causal")
    task = get_task("pubmedqa")
    demos = few_shot_demos(task, pubmedqa_examples[1:], 2, seed=0)
    enc = encode(task, pubmedqa_examples[0], fmt, 4096, shots=demos)
    text = fmt.tokenizer.decode(enc.prompt_ids)
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3


def _chat_example(turns: int, final: str = "Final question?"):
    from peftlab.data.tasks.base import Example

    messages = [{"role": "system", "content": "Be brief."}]
    for k in range(turns):
        messages += [{"role": "user", "content": f"Old question {k} about the weather."},
                     {"role": "assistant", "content": f"Old answer {k}."}]
    messages.append({"role": "user", "content": final.strip()})
    return Example("c", {"conversation": ""}, "Yes.", ("Yes.",), messages=tuple(messages), source="d.jsonl:7")


def test_a_long_conversation_loses_its_oldest_turns_first(tiny_causal):
    fmt = _fmt(tiny_causal, "causal")
    task, ex = get_task("chat"), _chat_example(10)
    full = encode(task, ex, fmt, max_length=100_000)
    cut = encode(task, ex, fmt, max_length=full.length // 2)
    text = fmt.tokenizer.decode(cut.prompt_ids)
    assert cut.length <= full.length // 2 and cut.truncated == full.length - cut.length
    # The system turn stays, the kept turns start on a user turn, the newest turns are whole, the oldest gone.
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOld question")
    assert "Old question 9 about the weather." in text and "Old question 0 " not in text
    assert text.endswith("Final question?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(PeftlabError, match=r"^d.jsonl:7: the conversation is \d+ tokens, over data.max_length"):
        encode(task, ex, fmt, max_length=full.length // 2, too_long="error")


def test_a_conversation_that_fits_only_cut_in_its_last_turn(tiny_causal):
    from peftlab.prompts.encoding import TooLong

    fmt = _fmt(tiny_causal, "causal")
    task, ex = get_task("chat"), _chat_example(2, final="A very long final question about the weather " * 6)
    budget = len(fmt.encode_messages(ex.messages[-1:])[0]) // 2 + len(fmt.target_ids("Yes."))
    cut = encode(task, ex, fmt, max_length=budget)
    text = fmt.tokenizer.decode(cut.prompt_ids)
    # No older turn and no system turn is left; the last question keeps its end.
    assert text.startswith("<|im_start|>user\n") and "Be brief." not in text and "Old" not in text
    assert text.endswith("about the weather<|im_end|>\n<|im_start|>assistant\n") and cut.length <= budget
    with pytest.raises(TooLong, match=r"^d.jsonl:7: the answer alone is \d+ tokens with the chat framing"):
        encode(task, ex, fmt, max_length=8)


def test_clip_text_grows_its_window_for_long_tokens():
    from types import SimpleNamespace

    from peftlab.prompts.encoding import CHARS_PER_TOKEN, clip_text

    def tokenizer(text, add_special_tokens=False):  # one token per 100 characters: longer than the bound assumes
        return SimpleNamespace(input_ids=list(range(-(-len(text) // 100))))

    text = "x" * 1_000_000
    window = clip_text(tokenizer, text, 10)
    assert len(window) > 10 * 100 and len(window) < 10 * 100 * 4 * CHARS_PER_TOKEN  # enough tokens, not the text
    assert clip_text(tokenizer, "short", 10) == "short"
