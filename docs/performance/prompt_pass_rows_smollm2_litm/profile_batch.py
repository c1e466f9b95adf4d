"""Where does a lost-in-the-middle batch's time go? Times evaluate_batch (static decoder) per batch, then profiles one.

python docs/performance/prompt_pass_rows_smollm2_litm/profile_batch.py MODEL DEVICE SUBSET MAXLEN ROWS COMPILE OUTDIR
"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seka_lightning.benchmarks import LostInTheMiddleDataModule, evaluate_batch
from seka_lightning.fast_decode import StaticDecoding
from seka_lightning.methods import HighlightMethod
from seka_lightning.models import load_model

name, device, subset, maxlen, rows, compile_, out = sys.argv[1:8]
maxlen, rows, compile_ = int(maxlen), int(rows), compile_ == "1"
add_special = "gemma" in name
t0 = time.perf_counter()
model, tok = load_model(name, dtype="float32", attn_implementation="sdpa")
model.to(device)
print(f"loaded in {time.perf_counter() - t0:.1f}s", flush=True)
dm = LostInTheMiddleDataModule(
    "../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz",
    example_subset=subset,
    batch_size=rows,
    max_new_tokens=60,
)
batches = dm.batches()
scorer = dm.scorer().to(device)
method = StaticDecoding(HighlightMethod(), max_length=maxlen, compile=compile_)
method.reserve_rows(rows)
method.setup(model, tok)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


times = []
with torch.no_grad():
    for i, batch in enumerate(batches):
        sync()
        t = time.perf_counter()
        out_rows, _ = evaluate_batch(method, model, tok, scorer, batch, device=device, add_special_tokens=add_special)
        sync()
        times.append(time.perf_counter() - t)
        lens = [len(tok(r["text"])["input_ids"]) for r in batch[:2]]
        print(f"batch {i}: {len(batch)} rows, {times[-1]:.3f}s, first prompt tokens ~{lens}", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        evaluate_batch(method, model, tok, scorer, batches[1], device=device, add_special_tokens=add_special)
        sync()
key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
table = prof.key_averages().table(sort_by=key, row_limit=40)
print(table)
table2 = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
print(table2)
with open(f"{out}/prof_{name.split(':')[-1]}.txt", "w") as f:
    f.write(json.dumps({"times": times, "argv": sys.argv}) + "\n" + table + "\n" + table2)
