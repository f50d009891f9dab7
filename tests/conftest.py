"""Test setup (offline, one torch thread, seeded) and the helpers several test files share: import them with
`from conftest import ...`; each exists once."""

import gzip
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, conftest

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from skipprofiler._cli.main import main as _cli_main  # noqa: E402
from skipprofiler.profile import METRICS, Profile  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------------
# the CLI and profile comparisons


def run(argv: list, capsys) -> tuple[int, str, str]:
    """Run the `skipprof` CLI in-process: (exit code, stdout, stderr)."""
    try:
        _cli_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Counts, histograms and non-finite counts are integers: exact. Means and m2 come from Chan's pairwise merge, whose
# order of additions differs from one pass over the same tokens, so they agree only to rounding: a few ulps per merge
# for means; m2 (sums of squared deviations, with a cancelling correction term) 100x looser. ATOL covers exact zeros.
MEAN_RTOL = 1e-12
M2_RTOL = 1e-10
ATOL = 1e-15


def assert_same_statistics(a: Profile, b: Profile) -> None:
    """Same classes, exactly the same counts and histograms, means and m2 equal up to merge rounding."""
    assert a.classes == b.classes
    assert np.array_equal(a.count, b.count) and np.array_equal(a.token_count, b.token_count)
    for m in METRICS:
        assert np.array_equal(a.hist[m], b.hist[m]), m
        assert np.array_equal(a.nonfinite[m], b.nonfinite[m]), m
        np.testing.assert_allclose(a.mean[m], b.mean[m], rtol=MEAN_RTOL, atol=ATOL, err_msg=m)
        np.testing.assert_allclose(a.m2[m], b.m2[m], rtol=M2_RTOL, atol=ATOL, err_msg=m)


# tokenizers and corpora
def word_tokenizer(vocab_size: int = 96, chat: bool = False):
    """A real fast tokenizer over words w0..w{n-1} (no download): 'w5 w7' -> [5, 7]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(2, vocab_size)}
    vocab.update({"[UNK]": 0, "[EOS]": 1})  # special tokens must not be substrings of words
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]", eos_token="[EOS]")
    if chat:
        tok.chat_template = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}"
    return tok


def words(n: int, start: int = 4) -> str:
    return " ".join(f"w{(start + i) % 90 + 4}" for i in range(n))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


WORDS = ("the river ran past the old mill while the miller slept and the wheel turned slowly in the dark water "
         "def main(): return sum(x for x in range(10)) if ready else None  # count the items ").split()


def char_tokenizer():
    """A character-level fast tokenizer with ids < 128 (tiny models here use vocab_size=128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    vocab.update({chr(c): c - 30 for c in range(32, 127)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def write_corpus(path: Path, docs_per_class: int = 3, words: int = 40) -> Path:
    rows = []
    for c, cls in enumerate(("prose", "code")):
        for d in range(docs_per_class):
            text = " ".join(WORDS[(c * 17 + d * 5 + i) % len(WORDS)] for i in range(words))[:max(4 * words, 4)]
            rows.append({"text": text, "class": cls, "source": "test"})
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_word_corpus(folder: Path) -> tuple[Path, Path]:
    """A tiny model with a word-level tokenizer ('w5 w9' -> [5, 9]) and a 3-class jsonl.gz corpus."""
    import gzip
    import json

    from tiny_models import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = folder / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]",
                            eos_token="w1").save_pretrained(model_dir)
    data = folder / "data.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for i in range(18):
            words = " ".join(f"w{(i * 7 + j) % 90 + 4}" for j in range(5 + (i * 7) % 30))
            f.write(json.dumps({"text": words, "class": "abc"[i % 3]}) + "\n")
    return model_dir, data


# profiles
BASE_CURVE = (0.80, 0.86, 0.90, 0.93, 0.95, 0.96, 0.97, 0.975, 0.97, 0.96, 0.94, 0.75)


def synthetic_profile(class_curves: dict[str, tuple[float, ...]], tokens: dict[str, int] | None = None,
                      regimes: tuple[str, ...] = ("prompt", "decode"), spread: float = 0.02, reservoir: int = 1500,
                      hidden: int = 8, docs: int = 20, seed: int = 0) -> Profile:
    """A Profile whose per-token residual cosines are Normal(curve[l], spread) per class (clipped below 1)."""
    rng = np.random.default_rng(seed)
    classes = list(class_curves)
    L = len(next(iter(class_curves.values())))
    R, C, K = 2, len(classes), reservoir
    edges = {m: np.linspace(0.0, 2.0, 401) if m in ("norm_ratio", "stream_gain") else np.linspace(-1.0, 1.0, 2001)
             for m in METRICS}
    hist = {m: np.zeros((R, L, C, len(edges[m]) + 1), np.int64) for m in METRICS}
    mean = {m: np.zeros((R, L, C)) for m in METRICS}
    m2 = {m: np.zeros((R, L, C)) for m in METRICS}
    nonfinite = {m: np.zeros((R, L, C), np.int64) for m in METRICS}
    count = np.zeros((R, L, C), np.int64)
    res = np.zeros((R, C, K, L), np.float32)
    res_gain = np.zeros((R, C, K, L), np.float32)
    res_len = np.zeros((R, C), np.int64)
    for r, regime in enumerate(("prompt", "decode")):
        if regime not in regimes:
            continue
        for c, name in enumerate(classes):
            n = (tokens or {}).get(name, K)
            cos = np.clip(np.asarray(class_curves[name]) + spread * rng.standard_normal((n, L)), -1, 0.99995)
            gain = 1.0 + 0.1 * rng.random((n, L))
            values = {"residual": cos, "ffn_io": cos * 0.5, "norm_ratio": gain - 0.9, "stream_gain": gain}
            for m, v in values.items():
                idx = np.searchsorted(edges[m], v, side="right")  # 0 = underflow, len(edges) = overflow
                for l in range(L):
                    hist[m][r, l, c] = np.bincount(idx[:, l], minlength=len(edges[m]) + 1)
                mean[m][r, :, c] = v.mean(axis=0)
                m2[m][r, :, c] = ((v - v.mean(axis=0)) ** 2).sum(axis=0)
            count[r, :, c] = n
            keep = min(n, K)
            res[r, c, :keep] = cos[:keep]
            res_gain[r, c, :keep] = gain[:keep]
            res_len[r, c] = keep
    centers = rng.standard_normal((C, hidden)) * 3
    features = (centers[:, None, :] + rng.standard_normal((C, docs, hidden))).astype(np.float32)
    header = {"format": "skipprof-profile", "format_version": 1,
              "model": {"name": "synthetic", "fingerprint": {"model_type": "llama", "num_layers": L,
                                                             "hidden_size": hidden, "vocab_size": 96,
                                                             "config_hash": "feedbeef"},
                        "max_position_embeddings": 512},
              "corpus": [{"spec": "synthetic", "sha256": "0" * 64}], "partial": False,
              "reservoir_size": K, "seed": seed}
    return Profile(header=header, classes=classes, edges=edges, hist=hist, count=count, mean=mean, m2=m2,
                   nonfinite=nonfinite, reservoir=res, reservoir_gain=res_gain, reservoir_len=res_len,
                   reservoir_keys=rng.random((R, C, K)), router_layer=L // 2, doc_features=features,
                   doc_len=np.full(C, docs, np.int64), doc_keys=rng.random((C, docs)))
