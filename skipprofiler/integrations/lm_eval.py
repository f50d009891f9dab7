"""EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``) with skip plans: a harness model and the runs behind
``skipprof eval --lm-eval`` (docs/lm-eval.md).

`SkipLM` is a harness model (``lm_eval.api.model.TemplateLM``) around a causal LM with an optional skip plan, applied
through the runtime (`apply_plan`) for the duration of every harness request batch. Decode-only semantics hold:

* ``generate_until``: the context is the prompt (dense); every generated token is a decode position, as in
  ``model.generate`` under `apply_plan` in deployment.
* ``loglikelihood`` (and multiple choice): the continuation is scored teacher-forced, as the tokens a generation
  after the context would produce (`handle.decode_from`). The logits that predict the first continuation token come
  from the dense prompt pass, exactly as the first generated token does; the plan acts on the positions that feed
  continuation tokens back. A one-token continuation (MMLU's " A") is therefore scored as the dense model scores it.
* ``loglikelihood_rolling``: each window the harness cuts is scored like a loglikelihood request whose context is
  its conditioning tokens (the prefix token for a document's first window): the document is what is generated.

Importing this module registers `SkipLM` with the harness as ``skipprof`` (the harness has no entry point for
model plugins: ``lm_eval --model skipprof`` works from a process that imported it, e.g. ``skipprof-lm-eval``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('skipprofiler.integrations.lm_eval needs lm-evaluation-harness: pip install "skipprofiler[lm-eval]"') from e

__all__ = ["SkipLM", "TASKS_DIR", "BUNDLED_TASKS", "HarnessError", "run_tasks", "cli_main"]

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
BUNDLED_TASKS = ("skipprof_qa", "skipprof_qa_chat", "skipprof_heldout_ppl")
MODEL_NAME = "skipprof"


class HarnessError(ValueError):
    """A harness run that cannot start or gives no numbers (one-line message)."""


@register_model(MODEL_NAME)
class SkipLM(TemplateLM):
    """A causal LM for lm-evaluation-harness, with a skip plan applied through skipprofiler's runtime.

    pretrained: a loaded transformers model, or a checkpoint folder / .gguf file / hub id (None: the bundled demo
    model). tokenizer: needed with a loaded model. plan: a PlanFile, SkipPlan or plan YAML path (None or "": dense).
    prompt_class: the plan's class to use (None: the global plan; "auto": its router). Log-likelihood batches hold at
    most `batch_size` rows and `max_batch_tokens` padded tokens. drop_layers: decoder layers
    that return their input on every position, prompt included (ShortGPT's layer drop, not a skip plan). From the
    harness's command
    line: ``--model skipprof --model_args pretrained=PATH,plan=PLAN.yaml,batch_size=16``.

    After a run, `skip_stats` holds the runtime's counts summed over every request batch (decode positions, FFN calls
    the plan's rule skipped).
    """

    backend = "causal"

    def __init__(self, pretrained: Any = None, tokenizer: Any = None, plan: Any = None, prompt_class: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", device: str | None = None, strict: bool = True,
                 drop_layers: Sequence[int] | None = None, max_batch_tokens: int = 8192, **_ignored: Any) -> None:
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness's CLI asks for cuda by default
        if pretrained is None or isinstance(pretrained, (str, Path)):
            from ..arch.models import load_model, load_tokenizer, model_source

            source = model_source(None if pretrained in (None, "") else str(pretrained))
            torch_dtype = getattr(torch, str(dtype), None) if str(dtype) != "auto" else torch.float32
            if not isinstance(torch_dtype, torch.dtype):
                raise HarnessError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
            model = load_model(source, dtype=torch_dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(source)
        else:
            model = pretrained
            if tokenizer is None:
                raise HarnessError("SkipLM(pretrained=<loaded model>) needs tokenizer=")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.plan = _load(plan)
        if isinstance(self.plan, tuple) and self.plan[0] == "drop_layers":  # eval's ShortGPT rows
            self.plan, drop_layers = None, self.plan[1]
        self.drop_layers = [int(x) for x in drop_layers] if drop_layers else None
        self.prompt_class = prompt_class
        self.strict = bool(strict) if not isinstance(strict, str) else strict.lower() not in ("0", "false", "no")
        if self.plan is not None and self.strict:
            from ..runtime.checks import fit_problems

            problems = fit_problems(self.model, self.plan)
            if problems:  # before the harness builds any request
                raise HarnessError(f"the plan does not fit this model: {'; '.join(problems)}")
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.max_batch_tokens = int(max_batch_tokens)
        self._device = next(model.parameters()).device
        self.skip_stats = {"decode_positions": 0, "decided_skips": 0, "num_layers": None}

    # ---- what the harness asks about the model ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.pad_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS when the tokenizer has one, else EOS (as the harness's hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(self.model.config, attr, None)
            if isinstance(value, int) and value > 0:
                return min(value, 8192)
        return 2048

    @property
    def pad_id(self) -> int:
        from ..evaluation.fidelity import pad_id_of

        return pad_id_of(self.tokenizer, self.model)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise HarnessError("this tokenizer has no chat template: run without --apply_chat_template "
                               "(the lm_eval command line) or without EvalConfig.lm_eval_chat")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids. add_special_tokens=None: the tokenizer's default, except for text that already starts with the
        BOS string (a rendered chat template), which gets none -- as `skipprofiler.evaluation.qa.build_prompts` encodes."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ---- the plan -----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _applied(self) -> Iterator[Any]:
        """The plan applied for one harness call (dense: no handle); its counts are added to `skip_stats`."""
        if self.drop_layers:
            from ..evaluation.blocks import DroppedLayers

            with DroppedLayers(self.model, self.drop_layers):
                yield None
            return
        if self.plan is None:
            yield None
            return
        from ..runtime import apply_plan

        with apply_plan(self.model, self.plan, prompt_class=self.prompt_class, strict=self.strict) as handle:
            yield handle
            stats = handle.stats()
        self.skip_stats["decode_positions"] += stats["decode_positions"]
        self.skip_stats["decided_skips"] += stats["decided_skips"]
        self.skip_stats["num_layers"] = stats["num_layers"]

    # ---- log-likelihood -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request.

        Rows are right-padded and run cache-less; positions from the one feeding the first continuation token on are
        decode positions (`handle.decode_from`), so the prediction of the first continuation token is the dense
        prompt pass's, as in generation."""
        limit = self.max_length
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise HarnessError("a log-likelihood request with an empty continuation")
            whole = (list(context) + list(continuation))[-(limit + 1):]
            rows.append((i, whole[:-1], len(continuation)))
        order = sorted(rows, key=lambda r: -len(r[1]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with self._applied() as handle:
            for batch in self._token_batches(order):
                width = len(batch[0][1])
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, tokens, _) in enumerate(batch):
                    ids[r, :len(tokens)] = torch.tensor(tokens)
                    mask[r, :len(tokens)] = 1
                decode_start = [len(tokens) - n + 1 for _, tokens, n in batch]
                scope = handle.decode_from(decode_start) if handle is not None else contextlib.nullcontext()
                with scope:
                    logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                        use_cache=False).logits
                log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
                for r, (i, tokens, n) in enumerate(batch):
                    target = torch.tensor(list(requests[i][2])[-n:])
                    lp = log_probs[r, len(tokens) - n:len(tokens)]
                    logprob = float(lp.gather(1, target[:, None]).sum())
                    greedy = bool((lp.argmax(-1) == target).all())
                    if not math.isfinite(logprob):
                        raise HarnessError("the model gave a non-finite log-likelihood")
                    out[i] = (logprob, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def _token_batches(self, rows: list) -> Iterator[list]:
        """Longest-first rows in batches of at most `batch_size` rows and `max_batch_tokens` padded tokens (a long
        document's windows go alone instead of padding 15 short ones to its length)."""
        batch: list = []
        for row in rows:
            width = len(batch[0][1]) if batch else len(row[1])
            if batch and (len(batch) >= self.batch_size or (len(batch) + 1) * width > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, cut into the harness's rolling windows (each window scored as a
        loglikelihood request after its conditioning tokens; the first window's is the prefix token)."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampling arguments are refused), cut at the first stop string and at EOS.

        Prompts are sorted by length and left-padded into batches of `batch_size`, as `skipprofiler.evaluation.qa` batches
        them, so a bundled QA run answers exactly as ``skipprof eval --qa`` does."""
        from ..evaluation.qa import _left_padded

        groups: dict[tuple, list[int]] = {}
        prompts, stops = [], []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
                raise HarnessError("SkipLM generates greedily: the task asks for sampling (do_sample / temperature)")
            prompt = self.tok_encode(context)
            prompt = prompt[-max(1, self.max_length - new_tokens):]
            prompts.append(prompt)
            stops.append(until)
            groups.setdefault((tuple(until), new_tokens), []).append(i)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        out = [""] * len(requests)
        with self._applied():
            for (until, new_tokens), members in groups.items():
                order = sorted(members, key=lambda i: len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    ids, mask = _left_padded([prompts[i] for i in idx], self.pad_id)
                    extra = {"stop_strings": list(until), "tokenizer": self.tokenizer} if until else {}
                    generated = self.model.generate(
                        input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                        max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                        pad_token_id=self.pad_id, eos_token_id=eos, **extra)
                    for r, i in enumerate(idx):
                        text = self.tok_decode(generated[r, ids.shape[1]:].tolist())
                        for stop in until:
                            text = text.split(stop, 1)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def _load(plan: Any):
    if plan is None or (isinstance(plan, str) and not plan.strip()):
        return None
    if isinstance(plan, (str, Path)):
        from ..runtime import load_plan

        return load_plan(Path(plan))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Runs for `skipprof eval --lm-eval`


def task_manager(include: Sequence[str | Path] = (), tasks: Sequence[str] | None = None):
    """The harness's task index over ours (`TASKS_DIR`), the folders in `include` and, unless every one of `tasks`
    is found there, the harness's own tasks (indexing those takes ~15 s)."""
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not Path(folder).is_dir():
            raise HarnessError(f"EvalConfig.lm_eval_include: not a folder: {folder}")
    paths = [str(TASKS_DIR), *map(str, include)]
    if tasks is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths)


def run_tasks(lm: SkipLM, tasks: Sequence[str], manager=None, limit: int | None = None, chat: bool = False,
              num_fewshot: int | None = None, bootstrap_iters: int = 1000) -> dict[str, Any]:
    """Run harness `tasks` with `lm` and return ``{"results": [{task, metric, value, stderr, samples}...],
    "decode_positions", "decided_skip_ratio"}`` (docs/eval-schema.md, ``lm_eval``)."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks=tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"unknown lm-eval task(s) {', '.join(unknown)} (bundled: {', '.join(BUNDLED_TASKS)}; "
                           "more in the folders of EvalConfig.lm_eval_include)")
    lm.skip_stats = {"decode_positions": 0, "decided_skips": 0, "num_layers": None}
    try:
        result = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                 num_fewshot=num_fewshot, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                 bootstrap_iters=bootstrap_iters, log_samples=False, verbosity="ERROR")
    except HarnessError:
        raise
    except (ConnectionError, OSError) as e:
        raise HarnessError(f"could not load a task's data ({_first_line(e)}); hub-hosted tasks need internet "
                           "access") from None
    except (ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise HarnessError(f"{type(e).__name__}: {_first_line(e)}") from None
    if not result:
        raise HarnessError("lm-eval returned no results")
    if lm.drop_layers:  # a layer drop, not a skip plan: no decode positions are counted
        return {"results": flatten(result), "dropped_layers": lm.drop_layers, "decode_positions": 0,
                "decided_skip_ratio": None}
    return {"results": flatten(result), **_skip_summary(lm.skip_stats)}


def flatten(result: dict) -> list[dict[str, Any]]:
    """One record per (task, metric) from ``simple_evaluate``'s results (groups' aggregates included)."""
    rows = []
    samples = result.get("n-samples", {})
    for task, metrics in result.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                         "value": _num(value), "stderr": _num(stderr),
                         "samples": (samples.get(task) or {}).get("effective")})
    return rows


def average_sections(sections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean value per (task, metric) over runs (the random baseline's seeds); stderr null: it is not one sample."""
    first = sections[0]
    results = []
    for record in first["results"]:
        key = (record["task"], record["metric"])
        values = [r["value"] for s in sections for r in s["results"] if (r["task"], r["metric"]) == key]
        ok = [v for v in values if v is not None]
        results.append({**record, "value": _num(sum(ok) / len(ok)) if len(ok) == len(sections) else None,
                        "stderr": None})
    return {"results": results, "runs": len(sections),
            "decode_positions": sum(s["decode_positions"] for s in sections),
            "decided_skip_ratio": _num(sum(s["decided_skip_ratio"] or 0 for s in sections) / len(sections)),
            "seconds": round(sum(s.get("seconds", 0) for s in sections), 1)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _skip_summary(stats: dict) -> dict[str, Any]:
    positions, layers = stats["decode_positions"], stats["num_layers"]
    ratio = stats["decided_skips"] / (positions * layers) if positions and layers else 0.0
    return {"decode_positions": positions, "decided_skip_ratio": _num(ratio)}


def cli_main() -> None:
    """``skipprof-lm-eval``: the harness's own command line with ``--model skipprof`` registered and the bundled
    tasks on the include path (another ``--include_path`` is added to them)."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:]
    if argv and argv[0] not in ("-h", "--help", "ls", "validate") and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    elif "--include_path" in argv:
        at = argv.index("--include_path") + 1
        if at < len(argv):
            argv[at] = f"{argv[at]},{TASKS_DIR}" if "," not in argv[at] else argv[at]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


def eval_sections(model, tokenizer, plans: Sequence[tuple[str, Any]], config, progress=None,
                  log=None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`skipprof eval --lm-eval`: the harness's results for the dense model and for each named plan, all on the same
    loaded model (the plan applied through the runtime). Returns (dense section, {plan name: section})."""
    tasks = list(config.lm_eval)
    if "skipprof_qa_chat" in tasks and not config.lm_eval_chat:
        raise HarnessError("skipprof_qa_chat is prompted through the chat template: add EvalConfig.lm_eval_chat "
                           "(skipprof_qa is the plain-text form)")
    manager = task_manager(config.lm_eval_include or (), tasks=tasks)
    runs = [("dense", None)] + list(plans)
    sections: dict[str, dict[str, Any]] = {}
    for name, plan in runs:
        lm = SkipLM(model, tokenizer, plan=plan, batch_size=config.batch_size)
        started = _now()
        if progress is not None:
            with progress.stage(f"lm-eval: {name}", 1) as tick:
                section = run_tasks(lm, tasks, manager, limit=config.lm_eval_limit, chat=config.lm_eval_chat)
                tick()
        else:
            section = run_tasks(lm, tasks, manager, limit=config.lm_eval_limit, chat=config.lm_eval_chat)
        section["seconds"] = round(_now() - started, 1)
        sections[name] = section
        if log:
            log(f"lm-eval {name}: {len(section['results'])} metrics in {section['seconds']:.0f} s")
    return sections.pop("dense"), sections


def _now() -> float:
    import time

    return time.perf_counter()
