"""The profiler's AbsMax reducer gives the same results through the Triton kernel as through torch."""

import json
import os
import subprocess
import sys

CODE = """
import json, workbench as wb
lm = wb.load('zoo:qwen3-moe')
sites = wb.all_sites(lm, ['expert', 'resid_post'])
prompts = wb.default_prompts()[:10]
r = wb.trace(lm, prompts, sites, ['absmax'], batch_size=4, progress=False)
out = {s.key: [r[s]['absmax'].absmax.tolist(), r[s]['absmax'].token.tolist(),
               int(r[s]['absmax'].nan_count), int(r[s]['absmax'].inf_count)] for s in sites}
# The profile's ExpertAbsMax (each expert's peak token only) beside the per-channel one, on rows out of token order
# with a tie across tokens: the kernel's maxima feed the same peak search
import torch
from workbench.tracing.reducers import ExpertAbsMax, Payload
g = torch.Generator().manual_seed(0)
x, ids, tok = torch.randn(60, 16, generator=g), torch.randint(0, 4, (60,), generator=g), torch.randperm(60, generator=g)
x[7], ids[7] = x[3], ids[3]
# NaN never wins (a NaN beside smaller values, a cell of NaN only), inf is a value: the kernel path counted NaN as 1
x[ids == 2, 5] = float("nan")
x[11, 1], x[13, 4], x[20, 0] = float("nan"), float("inf"), float("-inf")
for ct in (True, False):
    e = ExpertAbsMax(num_experts=4, channel_tokens=ct)
    for part in (slice(0, 25), slice(25, 60)):
        e.update(Payload(x[part], tok[part], experts=ids[part]))
    out[f"experts channel_tokens={ct}"] = [e.absmax.tolist(), e.results(), e.nan_count.tolist(), e.inf_count.tolist()]
print(json.dumps(out))
"""


def run(backend):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WORKBENCH_KERNELS": backend, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_absmax_through_triton_interpreter_equals_torch():
    torch_res, triton_res = run("torch"), run("triton")
    assert torch_res.keys() == triton_res.keys()
    for key in torch_res:
        assert torch_res[key] == triton_res[key], key
    assert torch_res["experts channel_tokens=True"] == torch_res["experts channel_tokens=False"]


def test_explicit_triton_on_cpu_without_interpreter_is_refused():
    """Proves the reducer really takes the kernel path when asked: without the interpreter it must refuse."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", WORKBENCH_KERNELS="triton")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0 and "needs a CUDA tensor" in out.stderr
