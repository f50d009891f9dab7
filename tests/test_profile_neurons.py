"""Per-neuron FFN statistics in the profile (issue 27.1): exact sums of the down projection's input at prompt and
decode positions, per class; merging, torchrun combination, the file format (version 1 files still load), the MoE
refusal and the accessors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run, word_tokenizer, words, write_jsonl
from tiny_models import MODEL_TYPES, tiny_model

from skipprofiler.arch.capture import down_weight
from skipprofiler.arch.registry import resolve
from skipprofiler.profile import Profile, ProfileError, ProfileSettings, merge_profiles, profile_model
from skipprofiler.profile.corpus import Batch
from skipprofiler.profile.data import to_tensors
from skipprofiler.profile.distributed import combine_rank_profiles

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
DENSE = [t for t in MODEL_TYPES if t not in MOE]
# Written out per family, independently of capture.down_projection: the module whose input is a.
DOWN = {"gpt2": "mlp.c_proj", "gptj": "mlp.fc_out", "gpt_neox": "mlp.dense_4h_to_h", "falcon": "mlp.dense_4h_to_h",
        "bloom": "mlp.dense_4h_to_h", "opt": "fc2"}
SMALL = dict(reservoir_size=16, doc_reservoir_size=4, seed=1)
RTOL, ATOL = 1e-5, 1e-6


def _batches(seed: int, n: int = 2, lengths=(10, 7, 4), classes=(0, 1, 0)) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.tensor(lengths)
        ids = torch.randint(2, 90, (len(lengths), max(lengths)), generator=g)
        mask = (torch.arange(max(lengths))[None, :] < lens[:, None]).long()
        out.append(Batch(torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask, torch.tensor(classes),
                         max(classes) + 1))
    return out


def _module(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def _reference(model, model_type: str, forwards, C: int) -> dict[str, np.ndarray]:
    """Sums of a, a^2 (a = the down projection's input) and x^2 (x = the FFN's input) per layer and class over the
    positions each forward selects: forwards = [(input_ids, attention_mask, select [B, S] bool, class_ids [B])]."""
    sites = resolve(model).sites
    seen: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for site in sites:
        down = _module(site.layer, DOWN.get(model_type, "mlp.down_proj"))
        first = site.fc1 if site.ffn is None else site.ffn
        hooks.append(down.register_forward_pre_hook(
            lambda m, args, l=site.index: seen.setdefault(l, {}).__setitem__("a", args[0].detach().clone())))
        hooks.append(first.register_forward_pre_hook(
            lambda m, args, kwargs, l=site.index: seen.setdefault(l, {}).__setitem__(
                "x", (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True))
    L = len(sites)
    out = {"sum": 0, "sq": 0, "input_sq": 0, "count": np.zeros((L, C), np.int64)}
    try:
        for ids, mask, select, class_ids in forwards:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            B, S = ids.shape
            for l in range(L):
                a = seen[l]["a"].reshape(B, S, -1).double()
                x = seen[l]["x"].reshape(B, S, -1).double()
                for name, v in (("sum", a), ("sq", a * a), ("input_sq", x * x)):
                    if isinstance(out[name], int):
                        out[name] = np.zeros((L, C, v.shape[-1]))
                    for b in range(B):
                        out[name][l, int(class_ids[b])] += v[b][select[b]].sum(0).numpy()
                for b in range(B):
                    out["count"][l, int(class_ids[b])] += int(select[b].sum())
    finally:
        for h in hooks:
            h.remove()
    return out


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids [B, S] without padding -> [B, S + n], greedy, recomputed from scratch each step (no cache)."""
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _assert_neurons(profile: Profile, r: int, ref: dict[str, np.ndarray]) -> None:
    assert np.array_equal(profile.neuron_count[r], ref["count"])
    for got, name in ((profile.neuron_sum, "sum"), (profile.neuron_sq, "sq"), (profile.input_sq, "input_sq")):
        np.testing.assert_allclose(got[r], ref[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("model_type", DENSE)
def test_prompt_sums_equal_the_down_projection_inputs_on_every_dense_family(model_type):
    model = tiny_model(model_type, num_layers=2)
    batches = _batches(0)
    profile = profile_model(model, batches, ProfileSettings(**SMALL), class_names=["a", "b"])
    assert profile.has_neurons and profile.header["neurons"]["intermediate_size"] == profile.num_neurons
    ref = _reference(model, model_type, [(b.input_ids, b.attention_mask, b.attention_mask.bool(), b.class_ids)
                                         for b in batches], 2)
    _assert_neurons(profile, 0, ref)
    assert profile.neuron_count[0, :, 0].tolist() == [2 * 21 - 2 * 7] * 2  # real tokens of class a, every layer
    # What the hook reads is the FFN's intermediate activation: the down projection of it is the FFN's output.
    down = _module(resolve(model).sites[0].layer, DOWN.get(model_type, "mlp.down_proj"))
    assert down_weight(down).shape == (profile.input_sq.shape[-1], profile.num_neurons)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_decode_sums_equal_a_direct_computation(model_type):
    """Decode positions: the profiler's cached greedy steps vs one cache-less forward over prompt + generated tokens
    (rows without padding, so both see the same positions); a computed from the FFN input by its formula too."""
    model = tiny_model(model_type, num_layers=3)
    batches = _batches(5, n=2, lengths=(6, 6), classes=(1, 0))
    new = 4
    profile = profile_model(model, batches, ProfileSettings(generate=new, **SMALL), class_names=["a", "b"],
                            eos_token_ids=[])
    forwards = []
    for b in batches:
        full = _greedy(model, b.input_ids, new)
        select = torch.zeros(full.shape, dtype=torch.bool)
        select[:, b.input_ids.shape[1]:] = True
        forwards.append((full, torch.ones_like(full), select, b.class_ids))
    ref = _reference(model, model_type, forwards, 2)
    assert profile.neuron_tokens("decode", 0) == 2 * 2 * new
    _assert_neurons(profile, 1, ref)


def test_the_hooked_input_is_the_gated_and_the_plain_activation():
    """a = act(gate x) * (up x) (Llama) and a = act(fc x) (GPT-2), computed from the FFN input by hand."""
    for model_type in ("llama", "gpt2"):
        model = tiny_model(model_type, num_layers=2)
        batches = _batches(2, n=1)
        profile = profile_model(model, batches, ProfileSettings(**SMALL), class_names=["a", "b"])
        mlp = resolve(model).sites[1].ffn
        xs = []
        hook = mlp.register_forward_pre_hook(lambda m, args, kwargs: xs.append(
            args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask, use_cache=False)
            hook.remove()
            x = xs[0]
            a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) if model_type == "llama" else mlp.act(mlp.c_fc(x))
        mask = batches[0].attention_mask.bool()
        expect = sum(a[b][mask[b]].double().sum(0) for b in (0, 2))  # class a: rows 0 and 2
        np.testing.assert_allclose(profile.neuron_sum[0, 1, 0], expect.numpy(), rtol=RTOL, atol=ATOL)


def test_accessors_pool_classes_by_tokens():
    model = tiny_model("llama", num_layers=2)
    profile = profile_model(model, _batches(3), ProfileSettings(generate=2, **SMALL), class_names=["a", "b"],
                            eos_token_ids=[])
    for regime in ("prompt", "decode"):
        r = ("prompt", "decode").index(regime)
        n = profile.neuron_count[r].sum(1)[:, None].astype(float)
        s, sq = profile.neuron_sum[r].sum(1), profile.neuron_sq[r].sum(1)
        np.testing.assert_allclose(profile.neuron_mean(regime), s / n)
        np.testing.assert_allclose(profile.neuron_energy(regime, 1), (sq / n)[1])
        np.testing.assert_allclose(profile.neuron_variance(regime, 0), np.maximum(sq / n - (s / n) ** 2, 0)[0])
        np.testing.assert_allclose(profile.input_sq_mean(regime, 1, "b"),
                                   profile.input_sq[r, 1, 1] / profile.neuron_count[r, 1, 1])
        assert profile.neuron_tokens(regime, 1, "a") == profile.neuron_count[r, 1, 0]
    assert profile.neuron_mean("decode").shape == (2, profile.num_neurons)
    assert np.all(profile.neuron_variance("prompt") >= 0)
    with pytest.raises(ProfileError, match="unknown class"):
        profile.neuron_mean("decode", 0, "zzz")
    with pytest.raises(ProfileError, match="out of range"):
        profile.neuron_energy("decode", 5)


def test_merge_and_torchrun_combination_of_shards_equal_one_profile_over_both():
    model = tiny_model("llama", num_layers=2)
    part_a, part_b = _batches(1), _batches(2, n=3)
    settings = ProfileSettings(generate=2, **SMALL)
    whole = profile_model(model, part_a + part_b, settings, class_names=["a", "b"], eos_token_ids=[])
    a = profile_model(model, part_a, settings, class_names=["a", "b"], eos_token_ids=[])
    b = profile_model(model, part_b, settings, class_names=["a", "b"], eos_token_ids=[])
    for merged in (merge_profiles([a, b]), combine_rank_profiles([a, b], 2, "gloo")):
        assert np.array_equal(merged.neuron_count, whole.neuron_count)
        for name in ("neuron_sum", "neuron_sq", "input_sq"):
            np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
        assert merged.header["neurons"] == whole.header["neurons"]


def test_merge_refuses_profiles_with_and_without_neuron_statistics():
    model = tiny_model("llama", num_layers=2)
    with_n = profile_model(model, _batches(1), ProfileSettings(**SMALL), class_names=["a", "b"])
    without = profile_model(model, _batches(2), ProfileSettings(neurons=False, **SMALL), class_names=["a", "b"])
    assert not without.has_neurons and without.header["neurons_skipped"] == "not requested"
    for pair in ([with_n, without], [without, with_n]):
        with pytest.raises(ProfileError, match=r"^profile 1 has (no )?per-neuron FFN statistics and the first has"):
            merge_profiles(pair)


def test_file_round_trip_and_version_1_files_still_load(tmp_path):
    from safetensors.numpy import save_file

    model = tiny_model("gpt2", num_layers=2)
    profile = profile_model(model, _batches(4), ProfileSettings(generate=2, **SMALL), class_names=["a", "b"],
                            eos_token_ids=[])
    loaded = Profile.load(profile.save(tmp_path / "p.prof"))
    assert loaded.header["format_version"] == 2 and loaded.has_neurons
    for name in ("neuron_sum", "neuron_sq", "neuron_count", "input_sq"):
        assert np.array_equal(getattr(loaded, name), getattr(profile, name))
    # A version 1 file, as skipprof wrote them before neuron statistics: no neuron.* tensors.
    tensors = {k: v for k, v in to_tensors(profile).items() if not k.startswith("neuron.")}
    header = dict(profile.header, format_version=1, classes=profile.classes, router_layer=profile.router_layer,
                  metrics=list(profile.hist))
    header.pop("neurons")
    save_file(tensors, str(tmp_path / "v1.prof"), metadata={"skipprof": json.dumps(header)})
    old = Profile.load(tmp_path / "v1.prof")
    assert not old.has_neurons and old.num_neurons == 0 and old.tokens("decode") == profile.tokens("decode")
    with pytest.raises(ProfileError, match="no per-neuron FFN statistics"):
        old.neuron_energy("decode", 0)
    resaved = Profile.load(old.save(tmp_path / "v1-resaved.prof"))
    assert resaved.header["format_version"] == 2 and not resaved.has_neurons
    # A damaged file (some neuron tensors missing) is one ProfileError.
    save_file({k: v for k, v in to_tensors(profile).items() if k != "neuron.sq"}, str(tmp_path / "bad.prof"),
              metadata={"skipprof": json.dumps(dict(header, format_version=2))})
    with pytest.raises(ProfileError, match="damaged.*neuron"):
        Profile.load(tmp_path / "bad.prof")


@pytest.mark.parametrize("model_type", MOE)
def test_moe_models_are_profiled_without_neurons_or_refused_when_asked(model_type):
    model = tiny_model(model_type, num_layers=2)
    profile = profile_model(model, _batches(0, n=1), ProfileSettings(**SMALL), class_names=["a", "b"])
    assert not profile.has_neurons and "sparse-MoE" in profile.header["neurons_skipped"]
    with pytest.raises(ProfileError) as info:
        profile_model(model, _batches(0, n=1), ProfileSettings(neurons=True, **SMALL), class_names=["a", "b"])
    message = str(info.value)
    assert "\n" not in message and model_type in message and "sparse-MoE" in message


def test_cli_refuses_neurons_on_a_moe_model_in_one_line(tmp_path, capsys):
    model = tiny_model("mixtral", num_layers=2)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    write_jsonl(tmp_path / "d.jsonl", [{"text": words(12, i)} for i in range(4)])
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "x.prof"
    code, stdout, err = run(["profile", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", out, "--neurons",
                             "--device", "cpu"], capsys)
    assert code != 0 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "sparse-MoE" in err and "mixtral" in err
    # Without --neurons the MoE model is profiled, and inspect says why there are no neuron statistics.
    code, _, err = run(["profile", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", out, "--device", "cpu"],
                       capsys)
    assert code == 0, err
    code, stdout, _ = run(["inspect", out], capsys)
    assert code == 0 and "no neuron statistics: mixtral" in stdout


def test_cli_inspect_names_the_neuron_statistics(tmp_path, capsys):
    model = tiny_model("llama", num_layers=2)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    write_jsonl(tmp_path / "d.jsonl", [{"text": words(12, i)} for i in range(4)])
    out = tmp_path / "n.prof"
    code, stdout, err = run(["profile", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", out, "--device",
                             "cpu", "--new-tokens", "2"], capsys)
    assert code == 0, err
    assert "neuron statistics: 48 neurons per layer x 2 layers" in stdout
    code, stdout, _ = run(["inspect", out, "--json"], capsys)
    assert json.loads(stdout)["neurons"]["intermediate_size"] == 48
    code, stdout, err = run(["profile", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", out, "--device",
                             "cpu", "--no-neurons"], capsys)
    assert code == 0, err and "neuron statistics" not in stdout
    assert not Profile.load(out).has_neurons
