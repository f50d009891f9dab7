"""lm-evaluation-harness integration (skipprofiler.integrations.lm_eval, `skipprof eval --lm-eval`) on the demo model: the bundled
QA task answers exactly as `skipprof eval --qa`, plans change the harness's numbers and an empty plan does not,
log-likelihoods follow decode-only semantics. Needs the lm-eval extra; nothing is downloaded (local tasks only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from skipprofiler import demo
from skipprofiler.evaluation import qa  # noqa: E402
from skipprofiler.evaluation import EvalConfig  # noqa: E402
from skipprofiler.integrations.lm_eval import (  # noqa: E402
    BUNDLED_TASKS,
    HarnessError,
    SkipLM,
    eval_sections,
    run_tasks,
    task_manager,
)
from skipprofiler.plan.model import PlanFile, SkipPlan  # noqa: E402
from skipprofiler.arch.registry import model_fingerprint  # noqa: E402
from skipprofiler.runtime import apply_plan, load_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATIC_25 = ROOT / "plans" / "demo-static-25.yaml"


@pytest.fixture(scope="module")
def demo_model():
    path = demo.model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def manager():
    return task_manager(tasks=BUNDLED_TASKS)  # the bundled tasks only: no index of the harness's own


def empty_plan(model) -> PlanFile:
    return PlanFile(model={"name": "demo", "fingerprint": model_fingerprint(model)},
                    global_plan=SkipPlan(mode="static", skip_layers={}))


def harness_qa(model, tok, plan, manager, limit: int, task: str = "skipprof_qa", chat: bool = False):
    lm = SkipLM(model, tok, plan=plan, batch_size=16)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                          bootstrap_iters=0, apply_chat_template=chat, fewshot_as_multiturn=chat, verbosity="ERROR")
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    contexts = [s["arguments"][0][0] for s in samples]
    return lm, contexts, [s["resps"][0][0] for s in samples], out["results"][task]["exact_match,none"]


def skipprof_qa(model, tok, plan, questions):
    """`skipprof eval --qa`'s answers: dense prompt passes, then the plan on generated tokens."""
    prompts = qa.build_prompts(tok, questions)
    prefills = qa.prefill(model, tok, prompts, batch_size=16)
    if plan is None:
        return prompts, qa.decode_prefilled(model, tok, prefills, len(prompts), 16)
    with apply_plan(model, plan) as handle:
        return prompts, qa.decode_prefilled(model, tok, prefills, len(prompts), 16, handle)


@pytest.mark.parametrize("plan", [None, STATIC_25], ids=["dense", "demo-static-25"])
def test_harness_qa_answers_exactly_as_skipprof_eval_qa(demo_model, manager, plan):
    model, tok = demo_model
    limit = 24
    questions = qa.load_questions()[:limit]
    plan = load_plan(plan) if plan else None
    prompts, expected = skipprof_qa(model, tok, plan, questions)
    lm, contexts, answers, accuracy = harness_qa(model, tok, plan, manager, limit)
    assert [lm.tok_encode(c) for c in contexts] == prompts  # the same prompt, token for token
    assert [a.strip() for a in answers] == expected
    assert any(expected)
    assert accuracy == qa.score(questions, expected).accuracy
    if plan is not None:
        assert lm.skip_stats["decided_skips"] > 0


def test_a_plan_changes_the_harness_numbers_and_an_empty_plan_does_not(demo_model, manager):
    model, tok = demo_model
    tasks = ["skipprof_heldout_ppl"]
    dense = run_tasks(SkipLM(model, tok), tasks, manager, limit=4)
    empty = run_tasks(SkipLM(model, tok, plan=empty_plan(model)), tasks, manager, limit=4)
    planned = run_tasks(SkipLM(model, tok, plan=load_plan(STATIC_25)), tasks, manager, limit=4)
    assert empty["results"] == dense["results"] and empty["decided_skip_ratio"] == 0.0
    assert empty["decode_positions"] > 0
    metrics = {r["metric"]: r["value"] for r in dense["results"]}
    assert set(metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(r["samples"] == 4 and r["task"] == "skipprof_heldout_ppl" for r in dense["results"])
    worse = {r["metric"]: r["value"] for r in planned["results"]}
    assert worse["word_perplexity"] != metrics["word_perplexity"]
    assert planned["decided_skip_ratio"] == pytest.approx(0.25, abs=0.02)


def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_scores_continuations_as_decode_positions(demo_model):
    model, tok = demo_model
    context = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    one = " in"
    many = " in want of a wife."
    assert len(tok(one, add_special_tokens=False)["input_ids"]) == 1
    requests = [_instance("loglikelihood", (context, one)), _instance("loglikelihood", (context, many))]
    dense = SkipLM(model, tok).loglikelihood(requests)
    planned_lm = SkipLM(model, tok, plan=load_plan(STATIC_25))
    planned = planned_lm.loglikelihood(requests)
    # The first continuation token is predicted by the dense prompt pass, as a first generated token is.
    assert planned[0] == dense[0]
    assert planned[1][0] != dense[1][0]
    # Direct check of the dense number: one forward over context + continuation.
    ids = tok(context + many, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    direct = sum(float(lp[p - 1, ids[p]]) for p in range(n_ctx, len(ids)))
    assert dense[1][0] == pytest.approx(direct, abs=1e-4)
    assert planned_lm.skip_stats["decode_positions"] == len(ids) - n_ctx - 1  # positions feeding continuation tokens


def test_loglikelihood_rolling_is_the_whole_document_after_the_prefix_token(demo_model):
    model, tok = demo_model
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition."
    lm = SkipLM(model, tok)
    (total,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert total == pytest.approx(sum(float(lp[p - 1, ids[p]]) for p in range(1, len(ids))), abs=1e-4)
    # longer than the model's context: cut into windows, every token scored once
    long_text = " ".join([text] * 80)
    short = SkipLM(model, tok, max_length=64)
    (windowed,) = short.loglikelihood_rolling([_instance("loglikelihood_rolling", (long_text,))])
    assert math.isfinite(windowed) and windowed < 0


def test_a_plan_for_another_model_is_refused_up_front(demo_model):
    model, tok = demo_model
    with pytest.raises(HarnessError, match="does not fit"):
        SkipLM(model, tok, plan=ROOT / "plans" / "smollm2-static-25.yaml")


def test_library_errors_name_the_eval_config_fields(tmp_path):
    """The library names EvalConfig fields (the CLI checks these first and prints its options)."""
    with pytest.raises(HarnessError, match="EvalConfig.lm_eval_include: not a folder"):
        task_manager([tmp_path / "missing"])
    with pytest.raises(HarnessError, match="add EvalConfig.lm_eval_chat"):
        eval_sections(None, None, [], EvalConfig(lm_eval=["skipprof_qa_chat"]))


def test_generation_refuses_sampling(demo_model):
    model, tok = demo_model
    with pytest.raises(HarnessError, match="greedily"):
        SkipLM(model, tok).generate_until([_instance("generate_until", ("Hello", {"do_sample": True}))])


def test_skipprof_eval_lm_eval_writes_sections(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", STATIC_25, "--no-speed", "--docs-per-class", "1", "--greedy-prompts", "1",
                             "--gen-len", "32", "--lm-eval", "skipprof_heldout_ppl", "--lm-eval-limit", "2",
                             "-o", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    dense, row = result["dense"]["lm_eval"], result["plans"][0]["lm_eval"]
    for section in (dense, row):
        assert {r["metric"] for r in section["results"]} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
        assert all(set(r) == {"task", "metric", "value", "stderr", "samples"} for r in section["results"])
    assert dense["decided_skip_ratio"] == 0.0 and row["decided_skip_ratio"] > 0
    assert result["config"]["lm_eval"] == ["skipprof_heldout_ppl"]
    assert "lm-evaluation-harness" in stdout and "word_perplexity" in stdout
    from skipprofiler.evaluation.report import make_report

    figures = make_report(None, result, tmp_path / "fig")
    assert (tmp_path / "fig" / "lm_eval_vs_skip.png") in figures


def test_skipprof_eval_lm_eval_usage_errors(tmp_path, capsys):
    code, _, err = run(["eval", STATIC_25, "--lm-eval-limit", "3"], capsys)
    assert code == 2 and "go with --lm-eval TASKS" in err and "Traceback" not in err
    code, _, err = run(["eval", STATIC_25, "--lm-eval", "skipprof_qa", "--lm-eval-include", tmp_path / "none"], capsys)
    assert code == 2 and "not a folder" in err and "Traceback" not in err
    code, _, err = run(["eval", STATIC_25, "--no-speed", "--docs-per-class", "1", "--greedy-prompts", "0",
                        "--gen-len", "32", "--lm-eval", "skipprof_qa_chat"], capsys)
    assert code == 2 and "add --lm-eval-chat" in err and "Traceback" not in err


@pytest.mark.slow
def test_baselines_get_harness_runs_with_baselines(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = run(["eval", STATIC_25, "--baselines", "--no-oracle", "--no-search-reference", "--no-speed",
                             "--docs-per-class", "1", "--greedy-prompts", "0", "--gen-len", "32", "--seeds", "2",
                             "--lm-eval", "skipprof_heldout_ppl", "--lm-eval-limit", "1", "-o", out], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out.read_text())["plans"]}
    random_row = next(r for n, r in rows.items() if n.startswith("random FFN"))
    assert random_row["lm_eval"]["runs"] == 2 and random_row["lm_eval"]["results"][0]["stderr"] is None
    shortgpt = next(r for n, r in rows.items() if n.startswith("ShortGPT"))
    assert shortgpt["lm_eval"]["dropped_layers"] and shortgpt["lm_eval"]["decided_skip_ratio"] is None
    without = sorted(n for n, r in rows.items() if "lm_eval" not in r)
    assert len(without) == 1 and without[0].startswith("ReplaceMe-style")  # eval-only hooks: no harness model
    values = {n: r["lm_eval"]["results"][0]["value"] for n, r in rows.items() if "lm_eval" in r}
    assert len(set(values.values())) == len(values)  # every row is a different model


@pytest.mark.slow
def test_unknown_task_is_one_line(capsys):
    code, _, err = run(["eval", STATIC_25, "--no-speed", "--docs-per-class", "1", "--greedy-prompts", "0",
                        "--gen-len", "32", "--lm-eval", "no_such_task_xyz"], capsys)
    assert code == 2 and "unknown lm-eval task(s) no_such_task_xyz" in err and "Traceback" not in err
    assert "more in the folders of --lm-eval-include)" in err


@pytest.mark.slow
def test_harness_command_line_runs_a_plan(tmp_path):
    """`skipprof-lm-eval --model skipprof`: the harness's own command line with our model registered."""
    script = Path(sys.executable).parent / "skipprof-lm-eval"
    if not script.exists():
        pytest.skip("the skipprof-lm-eval script is not installed (pip install -e .)")
    out = subprocess.run([str(script), "--model", "skipprof", "--model_args", f"plan={STATIC_25}", "--tasks",
                          "skipprof_heldout_ppl", "--limit", "2", "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipprof_heldout_ppl" in out.stdout and "word_perplexity" in out.stdout


@pytest.fixture(scope="module")
def smollm2():
    from skipprofiler.arch.models import ModelSourceError, load_model, load_tokenizer, model_source, smollm2_gguf

    try:
        source = model_source(str(smollm2_gguf()))
    except ModelSourceError as e:
        pytest.skip(str(e))
    return load_model(source, dtype=torch.float32), load_tokenizer(source)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("plan", [None, ROOT / "plans" / "smollm2-static-25.yaml"], ids=["dense", "smollm2-static-25"])
def test_smollm2_chat_qa_answers_exactly_as_skipprof_eval_qa(smollm2, manager, plan):
    """SmolLM2 has a chat template: skipprof_qa_chat with the template applied is `--qa`'s chat prompt."""
    model, tok = smollm2
    limit = 24
    questions = qa.load_questions()[:limit]
    plan = load_plan(plan) if plan else None
    prompts, expected = skipprof_qa(model, tok, plan, questions)
    lm, contexts, answers, accuracy = harness_qa(model, tok, plan, manager, limit, "skipprof_qa_chat", chat=True)
    assert [lm.tok_encode(c) for c in contexts] == prompts
    assert [a.strip() for a in answers] == expected
    assert accuracy == qa.score(questions, expected).accuracy > 0


def test_loglikelihood_batches_are_bounded_in_tokens_and_do_not_change_scores(demo_model):
    model, tok = demo_model
    texts = ["Emma Woodhouse, handsome, clever, and rich.", "It is a truth universally acknowledged. " * 30,
             "Call me Ishmael.", "The sea. " * 5]
    requests = [_instance("loglikelihood_rolling", (t,)) for t in texts]
    wide = SkipLM(model, tok).loglikelihood_rolling(requests)
    narrow_lm = SkipLM(model, tok, max_batch_tokens=64)
    rows = [(i, list(range(n)), 1) for i, n in enumerate((300, 40, 30, 10))]
    assert [len(b) for b in narrow_lm._token_batches(rows)] == [1, 1, 2]
    assert narrow_lm.loglikelihood_rolling(requests) == pytest.approx(wide, abs=1e-3)
