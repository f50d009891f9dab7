"""`--device-map`: parsing, and a profile of a model split by accelerate equals the profile of the unsplit model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_statistics
from tiny_models import tiny_model

from skipprofiler.profile.corpus import Batch
from skipprofiler.profile.distributed import hooked_devices, parse_device_map
from skipprofiler.arch.models import load_model
from skipprofiler.profile import ProfileSettings, profile_model

# Layers alternate between memory and disk offload: accelerate attaches AlignDevicesHooks that load the offloaded
# weights for each forward, so the capture hooks run inside accelerate's dispatch, as on a multi-GPU split.
SPLIT_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def corpus() -> list[Batch]:
    g = torch.Generator().manual_seed(4)
    out = []
    for classes in ((0, 1, 0), (1, 1, 0)):
        lengths = torch.randint(4, 12, (3,), generator=g)
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        out.append(Batch(torch.randint(2, 90, (3, width), generator=g) * mask, mask, torch.tensor(classes), 2))
    return out


def test_a_profile_across_a_split_device_map_equals_the_unsplit_profile(saved_model, tmp_path):
    settings = ProfileSettings(generate=3, reservoir_size=16, doc_reservoir_size=4, seed=2)
    plain = load_model(saved_model)
    split = load_model(saved_model, device_map=parse_device_map(json.dumps(SPLIT_MAP)), offload_folder=tmp_path)
    assert hooked_devices(plain) == set() and hooked_devices(split) == {"cpu"}
    offloaded = [name for name, m in split.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    assert offloaded and {".".join(name.split(".")[:3]) for name in offloaded} == {"model.layers.1", "model.layers.3"}
    whole = profile_model(plain, corpus(), settings, class_names=["a", "b"])
    spread = profile_model(split, corpus(), settings, class_names=["a", "b"])
    assert whole.tokens("decode") == 2 * 3 * 3
    assert_same_statistics(spread, whole)
    assert np.array_equal(spread.reservoir, whole.reservoir) and np.array_equal(spread.doc_features,
                                                                                whole.doc_features)


def test_presets_inline_json_and_files_parse(tmp_path):
    for preset in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert parse_device_map(preset) == preset
    assert parse_device_map(None) is None
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cuda:1"}') == {"model.layers.0": 0,
                                                                             "lm_head": "cuda:1"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(SPLIT_MAP))
    assert parse_device_map(str(path)) == SPLIT_MAP


@pytest.mark.parametrize("spec, message", [
    ("everywhere", "none of auto, balanced"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "none of auto"),
    ("{}", "non-empty object"),
    ('{"model.layers.0": "warp-drive"}', "is not a device"),
    ('{"model.layers.0": -1}', "negative"),
    ('{"model.layers.0": 1.5}', "GPU index or a string"),
    ('{"model.layers.0": "meta"}', "no weights"),
    ("missing-map.json", "file not found"),
])
def test_bad_device_maps_get_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_device_map(spec)
    assert "\n" not in str(info.value) and str(info.value).startswith("`device_map`")  # the CLI: --device-map


def test_disk_offload_needs_a_folder(saved_model):
    with pytest.raises(ValueError, match="offload_folder"):
        load_model(saved_model, device_map=dict(SPLIT_MAP))
