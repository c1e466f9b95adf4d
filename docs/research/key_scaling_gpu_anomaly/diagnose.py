"""The script that wrote device_logs/ (eighth GPU window; run there as ``diag.py BANK 8`` with the data at
/root/shared/data): Gemma-3 on the first PronChange bios, CPU against GPU, for no steering, key scaling
(length-adaptive and full strength) and SEKA: per-layer relative difference of the hidden states, the last-token
logits, and 20 greedy tokens on each device. Its ``shape`` line and highlighted tokens per row gave the cause away
(a wrongly converted tokenizer, README.md here).

    python docs/research/key_scaling_gpu_anomaly/diagnose.py BANK [RECORDS] [DATA]

Since commit 99a26b4 loading refuses transformers 5.17's conversion, so the 5.17 log is reproduced at 6ae93cf.
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
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
data = sys.argv[3] if len(sys.argv) > 3 else "/root/shared/data/biasbios_subset"
dm = PronChangeDataModule(path=data, split="test", max_new_tokens=20, batch_size=16)
batch = dm.batches()[0][:n]
model_c, tok = load_model("embedded:gemma3-270m")
model_g, _ = load_model("embedded:gemma3-270m")
model_g = model_g.cuda()
print(
    "sdpa backends",
    torch.backends.cuda.flash_sdp_enabled(),
    torch.backends.cuda.mem_efficient_sdp_enabled(),
    torch.backends.cuda.math_sdp_enabled(),
    torch.backends.cuda.matmul.allow_tf32,
    torch.backends.cudnn.allow_tf32,
    torch.get_float32_matmul_precision(),
)
enc = encode_examples(tok, batch, add_special_tokens=True)
print("shape", tuple(enc["input_ids"].shape), "highlighted per row", enc["highlight_mask"].sum(1).tolist())
methods = {
    "none": HighlightMethod(),
    "key_scaling": KeyScalingMethod(bank, gain_pos=4.0, layers="last6", length_reference=8, length_power=0.5),
    "key_scaling_full": KeyScalingMethod(bank, gain_pos=4.0, layers="last6"),
    "seka": SekaMethod(bank, gain_pos=4.0, layers="last6", length_reference=8, length_power=0.5),
}
for name, method in methods.items():
    out = {}
    for dev, model in (("cpu", model_c), ("cuda", model_g)):
        method.setup(model, tok)
        e = {k: v.to(dev) for k, v in enc.items()}
        with torch.no_grad(), method.active(model, e):
            o = model(input_ids=e["input_ids"], attention_mask=e["attention_mask"], output_hidden_states=True)
        out[len(out)] = [h.float().cpu() for h in o.hidden_states], o.logits[:, -1].float().cpu()
        method._fused = None
    (hc, lc), (hg, lg) = out[0], out[1]
    mask = enc["attention_mask"].bool()
    rel = [f"{((a - b)[mask].norm() / a[mask].norm()).item():.1e}" for a, b in zip(hc, hg, strict=True)]
    print(f"{name}: hidden rel diff per layer {rel}")
    print(
        f"{name}: last logits max|diff| {(lc - lg).abs().max().item():.3e}, argmax agree {(lc.argmax(-1) == lg.argmax(-1)).tolist()}, max logit cpu {lc.max().item():.1f} gpu {lg.max().item():.1f}"
    )
    for dev, model in (("cpu", model_c), ("cuda", model_g)):
        method.setup(model, tok)
        e = {k: v.to(dev) for k, v in enc.items()}
        t = time.time()
        with torch.no_grad():
            g = method.generate(model, e, max_new_tokens=20, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(g, skip_special_tokens=True)
        print(f"{name} {dev} ({time.time() - t:.1f}s):", [x[:40] for x in texts[:4]])
        method._fused = None
