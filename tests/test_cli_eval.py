"""`skipprof eval` / `skipprof report` end to end on a tiny saved model, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import char_tokenizer, write_corpus
from tiny_models import tiny_model

from skipprofiler._cli.main import main
from skipprofiler.plan.model import PlanFile, SkipPlan
from skipprofiler.plan import save_plan
from skipprofiler.arch.registry import model_fingerprint

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama", num_layers=6, vocab_size=128)
    model.save_pretrained(root / "model")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "model")
    fp = model_fingerprint(model)
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": fp},
                       global_plan=SkipPlan(mode="static", skip_layers={2: 1.0, 3: 1.0})), root / "static.yaml")
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": dict(fp, hidden_size=999)},
                       global_plan=SkipPlan(mode="static", skip_layers={2: 1.0})), root / "other.yaml")
    data = write_corpus(root / "heldout.jsonl.gz")
    return root, data


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


SMALL = ["--prompt-len", "8", "--gen-len", "32", "--docs-per-class", "3", "--greedy-prompts", "2",
         "--greedy-new-tokens", "4"]


@pytest.mark.slow
def test_eval_writes_json_with_the_documented_keys(saved, tmp_path, capsys):
    root, data = saved
    out = tmp_path / "eval.json"
    code = _run(["eval", str(root / "model"), str(root / "static.yaml"), "--data", str(data), "--json", str(out),
                 "--no-speed", "--baselines", "--seeds", "2", *SMALL])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["format"] == "skipprof-eval"
    first = result["plans"][0]
    for key in ("skip_ratio", "ppl", "ppl_dense", "kl_mean", "top1_agreement", "greedy_agreement", "speedup",
                "ideal_speedup"):
        assert key in first
    assert first["skip_ratio"] == pytest.approx(2 / 6)
    assert any(r["family"] == "oracle static" for r in result["plans"])
    assert "static" in capsys.readouterr().out  # the table


@pytest.mark.parametrize("argv, message", [
    (["eval", "{root}/model", "{root}/other.yaml", "--data", "{data}"], "another model"),
    (["eval", "{root}/model", "{root}/missing.yaml"], "plan file not found"),
    (["eval", "{root}/model", "{root}/static.yaml", "--data", "{root}/nope.jsonl"], "data path not found"),
    (["eval", "{root}/model"], "at least one PLAN"),
    (["eval", "{root}/model", "{root}/static.yaml", "--batch-decision", "vote"], "unknown --batch-decision"),
    (["eval", "{root}/static.yaml", "--sweep", "0.1,2"], "(0, 1)"),
    (["eval", "{root}/static.yaml", "--sweep", "0.1"], "--profile"),
    (["eval", "{root}/nothing-here", "{root}/static.yaml"], "model path not found"),
    (["report", "{root}/missing.prof", "--out", "{root}/fig"], "not found"),
])
def test_bad_input_is_one_line_error(saved, capsys, argv, message):
    root, data = saved
    code = _run([a.format(root=root, data=data) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_heldout_is_an_error(saved, tmp_path, capsys):
    root, _ = saved
    short = write_corpus(tmp_path / "short.jsonl.gz", words=1)
    code = _run(["eval", str(root / "model"), str(root / "static.yaml"), "--data", str(short), "--no-speed", *SMALL])
    err = capsys.readouterr().err
    assert code != 0 and "held-out data" in err and "Traceback" not in err
    assert "(--prompt-len 8 + --gen-len 32; lower --gen-len for shorter documents)" in err  # the library: EvalConfig


def test_eval_reports_generation_length_qa_retention_and_flags_a_warmup_covering_it(saved, tmp_path, capsys):
    root, data = saved
    fp = model_fingerprint(tiny_model("llama", num_layers=6, vocab_size=128))
    long_warmup = SkipPlan(mode="static", skip_layers={2: 1.0}, warmup_tokens=40, fit={"gen_len": 256})
    save_plan(PlanFile(model={"name": "tiny", "fingerprint": fp}, global_plan=long_warmup), tmp_path / "late.yaml")
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "class": "x", "question": f"What is {i} plus 1?",
                                             "answers": [str(i + 1)]}) + "\n" for i in range(5)))
    out = tmp_path / "eval.json"
    code = _run(["eval", str(root / "model"), str(root / "static.yaml"), str(tmp_path / "late.yaml"), "--data",
                 str(data), "--json", str(out), "--no-speed", "--qa-file", str(questions), *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert result["data"]["gen_len"] == 32 and result["dense"]["qa"]["n_questions"] == 5
    static, late = result["plans"]
    assert static["gen_len"] == 32 and static["saved_share"] == pytest.approx(2 / 6) and not static["warnings"]
    assert 0.0 <= static["qa_accuracy"] <= 1.0 and "qa_retention" in static
    # warm-up 40 >= the 32 evaluated positions: nothing skipped, and the row says so instead of looking lossless
    assert late["skip_ratio"] == 0 and late["saved_share"] == 0 and late["kl_mean"] == 0
    assert any("covers 32 of the 32" in w for w in late["warnings"])
    assert any("fitted for 256 generated tokens, evaluated at 32" in w for w in late["warnings"])
    assert any("skipped nothing" in w for w in late["warnings"])
    assert "warning: late: " in captured.err and "saved" in captured.out


def test_eval_reads_a_chat_format_heldout_file(saved, tmp_path, capsys):
    """A `messages` file with its own class column, read as `profile` reads it: rendered with the chat template."""
    root, _ = saved
    chats = tmp_path / "chats.jsonl"
    rows = [{"topic": topic, "messages": [{"role": "user", "content": f"tell me about {topic} number {i} " * 4},
                                          {"role": "assistant", "content": f"{topic} {i} is a fine thing " * 4}]}
            for topic in ("rivers", "mills") for i in range(3)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    code = _run(["eval", "--model", str(root / "model"), str(root / "static.yaml"), "--data", str(chats),
                 "--class-column", "topic", "--no-speed", "-o", str(out), *SMALL])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for column in ("greedy", "1st div", "speedup", "ideal"):  # every column is explained under the table
        assert f"{column}: " in printed.out, column
    result = json.loads(out.read_text())
    assert result["data"]["classes"] == ["rivers", "mills"]
    assert result["data"]["documents"] == 6 and all(n > 0 for n in result["data"]["tokens"].values())
    assert result["plans"][0]["skip_ratio"] == pytest.approx(2 / 6)


def test_progress_bars_show_each_running_stage_with_eta_and_drop_finished_ones():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from skipprofiler._cli.progress import StageBars, _columns
    from skipprofiler.progress import Progress as Stages

    screen = io.StringIO()
    with Progress(*_columns(), console=Console(file=screen, force_terminal=True, width=120)) as bar:
        bars = StageBars(bar)
        stages = Stages(bars)
        with stages.stage("dense pass", 4) as tick:
            tick()
            tick()
            (task,) = bar.tasks
            assert (task.description, task.completed, task.total) == ("dense pass", 2, 4)
            bar.refresh()
            assert "dense pass" in screen.getvalue() and "2/4" in screen.getvalue() and "eta" in screen.getvalue()
        assert bar.tasks == []


def test_class_plan_rows_keep_their_bracketed_names_and_report_the_router(tmp_path, capsys):
    """Row names like "[class plans, routed by label]" are text, not rich markup; the router row says how often it
    picked the labelled class."""
    plan = Path(__file__).parents[1] / "plans" / "demo-perclass-25.yaml"
    code = _run(["eval", str(plan), "--prompt-len", "16", "--gen-len", "16", "--docs-per-class", "2", "--greedy-prompts", "0",
                 "--no-speed", "-o", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "demo-perclass-25 [class plans, routed by label]" in out
    assert "demo-perclass-25 [class plans, routed by router]" in out
    assert "router: demo-perclass-25 [class plans, routed by router] sent" in out
