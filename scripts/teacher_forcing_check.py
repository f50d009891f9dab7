"""Does eval measure the plan users generate with? Greedy generation with a static plan of fractional layers, then the
same sequence teacher-forced with `handle.decode_from` (how eval, refine and the budgets measure): prints the first
decode index whose logits differ (or that none does) on the bundled demo model.

    python scripts/teacher_forcing_check.py [--steps 200] [--layers 4:0.7,6:0.35,8:0.65]
"""
import argparse

import torch
from transformers import AutoModelForCausalLM

import skipprofiler
from skipprofiler import demo
from skipprofiler.plan import SkipPlan

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--layers", default="4:0.7,6:0.35,8:0.65")
args = parser.parse_args()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(demo.model_path()).eval()
layers = {int(l): float(f) for l, f in (x.split(":") for x in args.layers.split(","))}
plan = SkipPlan(mode="static", skip_layers=layers)
prompt = torch.randint(3, model.config.vocab_size, (1, 16))
with skipprofiler.apply_plan(model, plan), torch.no_grad():
    out = model.generate(prompt, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
generated = torch.stack(out.logits, dim=1)[0]
with skipprofiler.apply_plan(model, plan) as handle, handle.decode_from(prompt.shape[1]), torch.no_grad():
    forced = model(input_ids=out.sequences[:, :-1]).logits[0, prompt.shape[1] - 1:]
diff = (forced - generated).abs().amax(-1)  # row r: the logits after decode index r - 1
bad = (diff > 1e-3).nonzero().flatten().tolist()
print(f"plan {layers}, {args.steps} generated tokens; max |logit diff| {diff.max().item():.3g}")
print("generation == teacher forcing at every position" if not bad else
      f"first differing decode index: {bad[0] - 1} ({len(bad)} positions differ)")
