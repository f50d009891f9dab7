"""The eval JSON's top level (docs/eval-schema.md): format, model, data, config, the dense row and the plan rows."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .fidelity import FidelitySums
from .config import EvalConfig, EvalError
from .data import EvalData
from .._jsonable import rounded

EVAL_FORMAT = "skipprof-eval"
EVAL_FORMAT_VERSION = 1


def dense_row(data: EvalData) -> dict[str, Any]:
    """The dense model's held-out perplexity, overall and per class, from the shared dense references."""
    sums = FidelitySums()
    for ref in data.references:
        for cls in dict.fromkeys(ref.row_class):
            sel = torch.tensor([c == cls for c in ref.row_class])
            nll = -ref.log_probs[sel].gather(1, ref.targets[sel][:, None]).double().sum()
            sums.add(cls, int(sel.sum()), 0.0, float(nll), float(nll), float(sel.sum()))
    return {"ppl": rounded(sums.summary(None)["ppl_dense"]),
            "per_class": {c: {"ppl": rounded(sums.summary(c)["ppl_dense"]), "tokens": sums.count[c]}
                          for c in sums.count}}


def build_result(model, data: EvalData, rows, config: EvalConfig, data_spec, model_name, data_name) -> dict:
    """The whole result; EvalError when a row's headline number is not finite."""
    from .. import __version__
    from ..arch.registry import model_fingerprint

    for row in rows:
        for key in ("kl_mean", "ppl", "ppl_dense", "top1_agreement", "skip_ratio"):
            value = row.get(key)
            if value is None or not math.isfinite(value):
                raise EvalError(f"{row['name']}: {key} is not a finite number ({value})")
    return {
        "format": EVAL_FORMAT, "format_version": EVAL_FORMAT_VERSION, "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": model_name, "fingerprint": model_fingerprint(model)},
        "data": {"spec": data_spec or "bundled held-out split", "name": data_name, "classes": data.classes,
                 "tokens": data.tokens(), "documents": sum(r.batch.input_ids.shape[0] for r in data.references),
                 "prompt_len": config.prompt_len, "gen_len": config.gen_len, "window": config.window},
        "config": {k: v for k, v in vars(config).items()},
        "dense": dense_row(data) | ({"qa": data.qa.dense.to_dict()} if data.qa is not None else {}),
        "plans": rows,
    }
