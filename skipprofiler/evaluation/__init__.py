"""`skipprof eval`: fidelity and speed of skip plans on held-out data, with baselines, references and sweeps.

One module per job:

- `config`: `EvalConfig` (every setting) and `EvalError`;
- `data`: the held-out windows, their dense references and greedy prompts, the dense QA passes (prepared once);
- `rows`: one measured row per plan and route (`plan_rows`), or per hooked baseline;
- `baselines`: random, contiguous window, paper defaults, LLM-Drop, ShortGPT, ReplaceMe-style, at a realized ratio;
- `oracle`: the exhaustive oracle and the search reference, found on the held-out windows themselves;
- `run`: `run_eval` (named plans) and `run_sweep` (plans fitted per target);
- `result`: the JSON's top level (docs/eval-schema.md);
- `families`: the row family names the figures and tables group by;
- `recipe`: `evaluate_plans()`, the whole stage, exported as `skipprofiler.evaluate_plans`.

This facade imports only the settings, so building an `EvalConfig` loads no torch.
"""

from __future__ import annotations

from .config import EvalConfig, EvalError

__all__ = ["EvalConfig", "EvalError"]
