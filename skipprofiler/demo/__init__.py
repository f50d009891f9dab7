"""The bundled demo: a small trained Llama and its four-class corpus, shipped as package data.

Every `skipprof` command falls back to these when no model or data is given, so the tool runs offline out of the box.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
CLASSES = ("fiction", "scripture", "docs", "code")
SPLITS = ("calibration", "heldout")


def model_path() -> Path:
    """Folder of the bundled Hugging Face checkpoint (loads with AutoModelForCausalLM.from_pretrained offline)."""
    path = _HERE / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {path}; reinstall skipprofiler or run "
                                "scripts/train_demo_model.py")
    return path


def corpus_path(split: str = "calibration") -> Path:
    """A bundled corpus split as JSON lines (gzip): records {"text", "class", "source"}."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; bundled splits: {', '.join(SPLITS)}")
    path = _HERE / "corpus" / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"the bundled corpus split is missing: {path}")
    return path


def data_spec(split: str = "calibration") -> str:
    """The `--data` spec that selects a bundled split, with labels from its `class` column."""
    return str(corpus_path(split))
