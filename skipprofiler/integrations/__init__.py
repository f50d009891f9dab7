"""Serving and judging plans with other tools: vLLM (`vllm`, the SKIPPROF_PLAN general plugin) and
lm-evaluation-harness (`lm_eval`, with the bundled tasks in `lm_eval_tasks/`)."""
