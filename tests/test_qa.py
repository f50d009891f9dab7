"""Short-answer QA (`skipprofiler.evaluation.qa`): the bundled set, the scoring rule, file errors, and generation with a plan."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import skipprofiler
from skipprofiler import demo
from skipprofiler.evaluation import qa
from skipprofiler.plan.model import PlanFile, SkipPlan
from skipprofiler.arch.registry import model_fingerprint

# ---- the bundled set ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def questions():
    return qa.load_questions()


def test_bundled_set_loads(questions):
    assert len(questions) >= 300
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids)
    counts = Counter(q.cls for q in questions)
    assert len(counts) >= 8
    assert min(counts.values()) >= 20, counts
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert q.question.strip() and q.answers
        assert all(qa.normalize_answer(a) for a in q.answers), q.id


def test_bundled_answers_not_in_their_question(questions):
    # Otherwise an echo of the question would be scored correct.
    for q in questions:
        assert not qa.is_correct(q.question, q.answers, q.question), q.id


def test_bundled_answers_score_themselves(questions):
    for q in questions:
        for a in q.answers:
            assert qa.is_correct(a, q.answers, q.question), (q.id, a)


def test_few_shot_examples_not_in_set(questions):
    asked = {qa.normalize_answer(q.question) for q in questions}
    for shot_q, _ in qa.FEW_SHOT_EXAMPLES:
        assert qa.normalize_answer(shot_q) not in asked


def test_score_and_retention(questions):
    sub = questions[:4]
    dense = qa.score(sub, [q.answers[0] for q in sub])
    assert dense.accuracy == 1.0 and dense.n_correct == 4 and dense.n_questions == 4
    plan = qa.score(sub, [sub[0].answers[0], "no idea", sub[2].answers[0], ""])
    assert plan.correct == [True, False, True, False]
    assert plan.accuracy == 0.5
    assert sum(t for _, t in plan.class_counts.values()) == 4
    assert plan.per_class[sub[0].cls] == plan.class_counts[sub[0].cls][0] / plan.class_counts[sub[0].cls][1]
    r = qa.retention(plan, dense)
    assert r == {"accuracy": 0.5, "retention": 0.5, "retention_on_dense_correct": 0.5, "questions": 4}
    zero = qa.score(sub, [""] * 4)
    assert qa.retention(plan, zero)["retention"] is None
    assert qa.retention(zero, plan)["retention_on_dense_correct"] == 0.0
    with pytest.raises(ValueError, match="4 questions but 3"):
        qa.score(sub, ["a", "b", "c"])
    json.dumps(plan.to_dict())


# ---- normalisation and the scoring rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("The Paris!", "paris"),
    ("  Washington,   D.C. ", "washington d c"),
    ("Brontë", "bronte"),
    ("1,000 grams", "1000 grams"),
    ("twenty-one", "twenty one"),
    ("An apple, a pear", "apple pear"),
    ("H2O", "h2o"),
])
def test_normalize_answer(text, expected):
    assert qa.normalize_answer(text) == expected


FRANCE = "What is the capital of France?"
USA = ["Washington", "Washington, D.C.", "Washington DC"]


@pytest.mark.parametrize("generated,answers,question", [
    ("Paris", ["Paris"], FRANCE),
    ("Paris.", ["Paris"], FRANCE),
    ("  paris  ", ["Paris"], FRANCE),
    ("**Paris**", ["Paris"], FRANCE),
    ("The capital of France is Paris.", ["Paris"], FRANCE),
    ("Paris, France", ["Paris"], FRANCE),
    ("Answer: Paris", ["Paris"], None),
    ("Paris\nQuestion: What is the capital of Spain?\nAnswer: Madrid", ["Paris"], FRANCE),
    ("The capital of France is Paris. It is known for the Eiffel Tower.", ["Paris"], FRANCE),
    ("Washington, D.C.", USA, "What is the capital of the United States?"),
    ("The capital of the United States is Washington, D.C. It is", USA, "What is the capital of the United States?"),
    ("7 plus 5 is 12.", ["12", "twelve"], "What is 7 plus 5?"),
    ("7 + 5 = 12", ["12", "twelve"], "What is 7 plus 5?"),
    ("Twelve", ["12", "twelve"], "What is 7 plus 5?"),
    ("1,000", ["1000", "one thousand"], "How many grams are in a kilogram?"),
    ("Hamlet was written by William Shakespeare.", ["William Shakespeare", "Shakespeare"],
     "Who wrote the play Hamlet?"),
    ("J.K. Rowling", ["J. K. Rowling", "J.K. Rowling", "JK Rowling", "Rowling"], "Who wrote the Harry Potter books?"),
    ("Charlotte Brontë", ["Charlotte Bronte"], "Who wrote the novel Jane Eyre?"),
    ('The opposite of "hot" is "cold."', ["cold"], 'What is the opposite of "hot"?'),
    ("The chemical symbol for gold is Au.", ["Au"], "What is the chemical symbol for gold?"),
    ("The capital of Mexico is Mexico City.", ["Mexico City"], "What is the capital of Mexico?"),
    ("The SI unit of frequency is Hertz (Hz).", ["hertz", "Hz"], "What is the SI unit of frequency?"),
    ("12 (twelve)", ["12", "twelve"], "What is 7 plus 5?"),
])
def test_is_correct_accepts(generated, answers, question):
    assert qa.is_correct(generated, answers, question)


@pytest.mark.parametrize("generated,answers,question", [
    ("Lyon", ["Paris"], FRANCE),
    ("", ["Paris"], FRANCE),
    ("Paris, Lyon or Marseille", ["Paris"], FRANCE),                     # a hedge among other candidates
    ("It could be Lyon, Marseille, Nice or Paris.", ["Paris"], FRANCE),
    ("Paris is a beautiful city with many museums", ["Paris"], FRANCE),  # an answer inside a ramble
    ("France is a country in Europe.\nThe capital is Paris.", ["Paris"], FRANCE),  # only the first line counts
    ("Lyon. No wait, Paris.", ["Paris"], FRANCE),                        # only the first sentence (or line) counts
    ("Parisian", ["Paris"], FRANCE),                                     # whole words only
    ("The capital of France is Paris", ["Paris"], None),                 # without the question, no echo allowed
    ("Mexico", ["Mexico City"], "What is the capital of Mexico?"),       # part of a variant
    ("7 plus 5 is 13.", ["12", "twelve"], "What is 7 plus 5?"),
    ("112", ["12", "twelve"], "What is 7 plus 5?"),
    ("Shakespeare or Marlowe", ["William Shakespeare", "Shakespeare"], "Who wrote the play Hamlet?"),
    ("A decade is approximately 10 years.", ["10", "ten"], "How many years are in a decade?"),
    ('The opposite of "closed" is "closed".', ["closed", "shut"], 'What is the opposite of "open"?'),
    ("12 or twelve", ["12", "twelve"], "What is 7 plus 5?"),
    ("Paris (or Lyon)", ["Paris"], FRANCE),                              # only a parenthesised variant is dropped
])
def test_is_correct_rejects(generated, answers, question):
    assert not qa.is_correct(generated, answers, question)


# ---- file errors ----------------------------------------------------------------------------------------------------


GOOD = {"id": "x-001", "class": "x", "question": "What is 1 plus 1?", "answers": ["2", "two"]}


def write(tmp_path, *lines):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_custom_file(tmp_path):
    path = write(tmp_path, json.dumps(GOOD), "", json.dumps(dict(GOOD, id="x-002")))
    qs = qa.load_questions(str(path))
    assert [q.id for q in qs] == ["x-001", "x-002"]
    assert qs[0] == qa.Question("x-001", "x", "What is 1 plus 1?", ["2", "two"])


@pytest.mark.parametrize("lines,message", [
    ([], "question file is empty"),
    (["", "  "], "question file is empty"),
    ([json.dumps(GOOD), "{not json"], r"q\.jsonl:2: not valid JSON"),
    ([json.dumps([1, 2])], r"q\.jsonl:1: expected a JSON object"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "answers"})], r"q\.jsonl:1: missing key\(s\) answers"),
    ([json.dumps({"id": "a"})], r"missing key\(s\) class, question, answers"),
    ([json.dumps(dict(GOOD, answers=[]))], "'answers' must be a non-empty list"),
    ([json.dumps(dict(GOOD, answers=["the"]))], "'answers' must be a non-empty list of non-empty strings"),
    ([json.dumps(dict(GOOD, answers="2"))], "'answers' must be a non-empty list"),
    ([json.dumps(dict(GOOD, question=""))], "'question' must be a non-empty string"),
    ([json.dumps(GOOD), json.dumps(GOOD)], r"q\.jsonl:2: duplicate id 'x-001'"),
])
def test_bad_files(tmp_path, lines, message):
    path = write(tmp_path, *lines)
    with pytest.raises(qa.QAError, match=message) as info:
        qa.load_questions(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(qa.QAError, match="question file not found"):
        qa.load_questions(tmp_path / "nope.jsonl")
    assert issubclass(qa.QAError, ValueError)


# ---- prompts and generation on the demo model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    path = demo.model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def sample(questions):
    # Different classes, so the prompts differ in length and batches are left-padded.
    return [questions[i] for i in (0, 50, 95, 140, 190, 230, 275, 320)]


def test_build_prompts_plain(demo_model, sample):
    model, tok = demo_model
    assert not getattr(tok, "chat_template", None)
    prompts = qa.build_prompts(tok, sample)
    assert len(prompts) == len(sample) and all(isinstance(t, int) for t in prompts[0])
    text = tok.decode(prompts[0])
    assert text.rstrip().endswith(f"Question: {sample[0].question}\nAnswer:")
    for shot_q, shot_a in qa.FEW_SHOT_EXAMPLES:
        assert f"Question: {shot_q}\nAnswer: {shot_a}" in text
    assert len({len(p) for p in prompts}) > 1


class _ChatTokenizer:
    """Just enough of a tokenizer with a chat template to check the messages build_prompts sends."""
    chat_template = "x"

    def __init__(self):
        self.seen = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.seen.append(messages)
        return "|".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [len(w) for w in text.split("|")]}


def test_build_prompts_chat(sample):
    tok = _ChatTokenizer()
    prompts = qa.build_prompts(tok, sample[:2])
    assert len(prompts) == 2
    messages = tok.seen[0]
    assert messages[0] == {"role": "system", "content": qa.SYSTEM_PROMPT}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(qa.FEW_SHOT_EXAMPLES)
    assert messages[-1] == {"role": "user", "content": sample[0].question}


def test_generate_with_empty_plan_and_batch_invariance(demo_model, sample):
    model, tok = demo_model
    prompts = qa.build_prompts(tok, sample)
    calls = []
    batched = qa.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=8,
                                  progress=lambda d, t: calls.append((d, t)))
    assert calls == [(8, 8)]
    assert len(batched) == len(sample) and all(isinstance(a, str) for a in batched)
    assert any(batched)
    one_by_one = qa.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert one_by_one == batched

    plan = PlanFile(model={"name": "demo", "fingerprint": model_fingerprint(model)},
                    global_plan=SkipPlan(mode="static", skip_layers={}))
    with skipprofiler.apply_plan(model, plan):
        planned = qa.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert planned == batched


def test_generate_with_a_static_plan_skips(demo_model, sample):
    model, tok = demo_model
    prompts = qa.build_prompts(tok, sample[:3])
    plan = PlanFile(model={"name": "demo", "fingerprint": model_fingerprint(model)},
                    global_plan=SkipPlan(mode="static", skip_layers={8: 1.0, 9: 1.0}))
    with skipprofiler.apply_plan(model, plan) as handle:
        answers = qa.generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=3)
        stats = handle.stats()
    assert len(answers) == 3
    assert stats["decided_skip_ratio"] > 0, stats


def test_generate_rejects_bad_batch_size(demo_model):
    model, tok = demo_model
    with pytest.raises(ValueError, match="batch_size"):
        qa.generate_answers(model, tok, [[1, 2]], batch_size=0)


@pytest.mark.parametrize("plan_path", [None, "static", "plans/demo-adaptive-25.yaml"])
def test_prefilled_decoding_answers_exactly_as_generate(demo_model, sample, plan_path):
    from pathlib import Path

    model, tok = demo_model
    prompts = qa.build_prompts(tok, sample)
    if plan_path == "static":
        plan = PlanFile(model={"name": "demo", "fingerprint": model_fingerprint(model)},
                        global_plan=SkipPlan(mode="static", skip_layers={4: 1.0, 5: 1.0, 7: 0.5}, dense_every=3))
    elif plan_path is not None:
        plan = skipprofiler.runtime.load_plan(Path(__file__).resolve().parent.parent / plan_path)
    prefills = qa.prefill(model, tok, prompts, batch_size=3)
    if plan_path is None:
        expected = qa.generate_answers(model, tok, prompts, max_new_tokens=14, batch_size=3)
        assert qa.decode_prefilled(model, tok, prefills, len(prompts), max_new_tokens=14) == expected
        return
    with skipprofiler.apply_plan(model, plan) as handle:
        expected = qa.generate_answers(model, tok, prompts, max_new_tokens=14, batch_size=3)
        via_generate = handle.stats()
        handle.reset_stats()
        got = qa.decode_prefilled(model, tok, prefills, len(prompts), max_new_tokens=14, handle=handle)
        via_prefill = handle.stats()
    assert got == expected
    assert via_prefill["decided_skips"] == via_generate["decided_skips"] > 0
    dense = qa.decode_prefilled(model, tok, prefills, len(prompts), max_new_tokens=14)
    assert dense == qa.generate_answers(model, tok, prompts, max_new_tokens=14, batch_size=3)  # prefill reused intact
