"""One data path: eval's held-out windows, `--refine`'s calibration references and the linear substitutes'
calibration batches are the same documents -> token windows -> batches (`fidelity.prepare_windows`)."""

from __future__ import annotations

import random

from helpers import word_tokenizer, write_jsonl
from tiny_models import tiny_model

from skipprofiler.evaluation.config import EvalConfig
from skipprofiler.evaluation.data import prepare_data
from skipprofiler.evaluation.fidelity import load_documents, make_batches, pad_id_of, token_windows
from skipprofiler.fit.measure import calibration_references
from skipprofiler.fit.substitute import calibration_batches

PROMPT, GEN, PER_CLASS, BATCH = 4, 12, 3, 2


def _rows(batches) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(b.input_ids[r][b.attention_mask[r].bool()].tolist()), b.classes[r])
                  for b in batches for r in range(b.input_ids.shape[0]))


def test_eval_refine_and_substitutes_read_the_same_windows(tmp_path):
    rng = random.Random(0)
    records = [{"class": cls, "text": " ".join(f"w{rng.randrange(4, 90)}" for _ in range(rng.randrange(18, 30)))}
               for _ in range(5) for cls in ("prose", "code")]
    spec = str(write_jsonl(tmp_path / "docs.jsonl", records))
    model, tokenizer = tiny_model("llama", vocab_size=96), word_tokenizer()
    window = PROMPT + GEN

    # what the three hand-written copies computed before they shared one function
    docs = load_documents(spec)
    tokens, classes = token_windows(tokenizer, docs, window, PER_CLASS, PROMPT + 2)
    pad = pad_id_of(tokenizer, model)
    per_class = []
    for cls in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == cls]
        per_class += make_batches([tokens[i] for i in idx], [cls] * len(idx), PROMPT, pad, BATCH)
    expected = _rows(per_class)
    assert len(expected) == 2 * PER_CLASS and all(len(t) == window for t, _ in expected)

    refine = [ref.batch for ref in calibration_references(model, tokenizer, spec, prompt_len=PROMPT, window=window,
                                                          docs_per_class=PER_CLASS, batch_size=BATCH)]
    substitutes = calibration_batches(model, tokenizer, spec, skip_docs_per_class=0, docs_per_class=PER_CLASS,
                                      prompt_len=PROMPT, gen_len=GEN, batch_size=BATCH)
    config = EvalConfig(prompt_len=PROMPT, gen_len=GEN, docs_per_class=PER_CLASS, batch_size=BATCH, greedy_prompts=0,
                        speed=False)
    held = prepare_data(model, tokenizer, spec, config)
    assert _rows(refine) == _rows(substitutes) == _rows([r.batch for r in held.references]) == expected
    assert sorted((tuple(t), c) for t, c in held.windows) == expected
    # eval and --refine batch per class (same batches as before); substitutes mix the classes, as before
    assert [(b.input_ids.tolist(), b.classes) for b in refine] == [(b.input_ids.tolist(), b.classes) for b in per_class]
    assert [(r.batch.input_ids.tolist(), r.batch.classes) for r in held.references] == \
        [(b.input_ids.tolist(), b.classes) for b in per_class]
    mixed = make_batches(tokens, classes, PROMPT, pad, BATCH)
    assert [(b.input_ids.tolist(), b.classes) for b in substitutes] == [(b.input_ids.tolist(), b.classes) for b in mixed]
