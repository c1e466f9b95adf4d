"""The diagnosis run on the device (eighth GPU window): Gemma-3 on the first PronChange bios, CPU against GPU, for no
steering, key scaling (length-adaptive and full strength) and SEKA: per-layer relative difference of the hidden
states, the last-token logits, and 20 greedy tokens on each device. It also prints the prompt length and the
highlighted tokens per row, which is what gave the cause away (a wrongly converted tokenizer, README.md here).

    python docs/research/key_scaling_gpu_anomaly/diagnose.py BANK [RECORDS] [DATA]
"""

import sys
import time

import torch

from seka_lightning import load_model
from seka_lightning.baselines.key_scaling import KeyScalingMethod
from seka_lightning.benchmarks import PronChangeDataModule
from seka_lightning.benchmarks.evaluate import encode_examples
from seka_lightning.methods import HighlightMethod, SekaMethod

bank = sys.argv[1]
records = int(sys.argv[2]) if len(sys.argv) > 2 else 8
data = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/biasbios_subset"
batch = PronChangeDataModule(path=data, split="test", max_new_tokens=20, batch_size=16).batches()[0][:records]
model_cpu, tokenizer = load_model("embedded:gemma3-270m")
model_gpu = load_model("embedded:gemma3-270m")[0].cuda()
enc = encode_examples(tokenizer, batch, add_special_tokens=True)
print("prompt", tuple(enc["input_ids"].shape), "highlighted tokens per row", enc["highlight_mask"].sum(1).tolist())
schedule = {"gain_pos": 4.0, "layers": "last6", "length_reference": 8, "length_power": 0.5}
methods = {
    "none": HighlightMethod(),
    "key_scaling": KeyScalingMethod(bank, **schedule),
    "key_scaling_full": KeyScalingMethod(bank, gain_pos=4.0, layers="last6"),
    "seka": SekaMethod(bank, **schedule),
}
mask = enc["attention_mask"].bool()
for name, method in methods.items():
    out = []
    for model in (model_cpu, model_gpu):
        method.setup(model, tokenizer)
        inputs = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad(), method.active(model, inputs):
            o = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
        out.append(([h.float().cpu() for h in o.hidden_states], o.logits[:, -1].float().cpu()))
    (hidden_cpu, logits_cpu), (hidden_gpu, logits_gpu) = out
    rel = [f"{((a - b)[mask].norm() / a[mask].norm()).item():.1e}" for a, b in zip(hidden_cpu, hidden_gpu, strict=True)]
    print(f"{name}: hidden states, relative difference per layer {rel}")
    agree = (logits_cpu.argmax(-1) == logits_gpu.argmax(-1)).tolist()
    print(f"{name}: last logits max |diff| {(logits_cpu - logits_gpu).abs().max().item():.3e}, argmax agree {agree}")
    for model in (model_cpu, model_gpu):
        method.setup(model, tokenizer)
        inputs = {k: v.to(model.device) for k, v in enc.items()}
        start = time.time()
        with torch.no_grad():
            new = method.generate(model, inputs, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        print(f"{name} {model.device} ({time.time() - start:.1f}s):", [t[:40] for t in texts[:4]])
