"""Exact replay of one draw of the tp LoRA test (tests/model/tensor_parallel_test.cpp,
LoraOnEveryLayerGivesTheOneRankAdapterGradientSlices), written by
tests/model/tp_lora_replay_dump_test.cpp: is a difference between the tp path and one rank
float32 rounding, or a fault?

Prints, against PyTorch float64 on the same weights, adapters, tokens and dropout masks:
the loss and the clipping norm of both float32 runs; per adapter tensor the largest error
of one rank and of tp (as a share of the tensor's largest gradient); PyTorch's own float32
error; and the conditioning of the draw: how far the exact float64 gradients move when every
input float is nudged by float32's unit roundoff (2^-24). When the tp-vs-one-rank
difference is far below that, and both float32 results are as far from the exact gradient
as PyTorch float32 is, the difference is rounding, not a missing term or a wrong slice.

    python3 tests/reference/replay_tp_lora_float64.py DIR
"""
import json, sys, os, types
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_llama as tl
import torch.nn.functional as F
d = sys.argv[1]
meta = json.load(open(os.path.join(d, "meta.json")))
model = tl.load_hf_dir(os.path.join(d, "model"), torch.float64)
_, ad = tl.read_peft_adapter(os.path.join(d, "adapter"))
_, g1 = tl.read_peft_adapter(os.path.join(d, "grad_one"))
_, g2 = tl.read_peft_adapter(os.path.join(d, "grad_tp"))
leaves = {n: t.to(torch.float64).clone().requires_grad_(True) for n, t in ad.items()}
tl.attach_lora(model, leaves, meta["scale"])
masks = np.fromfile(os.path.join(d, "masks.bin"), dtype=np.float32)
B, T = meta["B"], meta["T"]
for key, (at, n_in) in meta["masks"].items():
    l, target = key.split(".")
    mod = model.get_submodule(tl.lora_module_path(int(l), target))
    mod.mask = torch.from_numpy(masks[at:at + B * T * n_in].astype(np.float64)).reshape(B, T, n_in)
    def fwd(self, x):
        a, b = self.lora
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x * self.mask, a), b)
    mod.forward = types.MethodType(fwd, mod)
for p in model.parameters(): p.requires_grad_(False)
tokens = torch.tensor(meta["tokens"]).reshape(B, T)
targets = torch.tensor(meta["targets"]).reshape(B, T)
_, loss = model(tokens, targets)
loss.backward()
print(f"loss mean: float64 {loss.item():.10g}  one-rank {meta['loss_one']/meta['num_tokens']:.10g}  tp {meta['loss_tp']/meta['num_tokens']:.10g}")
n2 = sum(float((t.grad**2).sum()) for t in leaves.values())
print(f"norm2: float64 {n2:.6f}  one-rank {meta['norm2_one']:.6f} (rel {(meta['norm2_one']-n2)/n2:.2e})  tp {meta['norm2_tp']:.6f} (rel {(meta['norm2_tp']-n2)/n2:.2e})")
worst = []
for n, t in leaves.items():
    exact = t.grad
    e1 = (g1[n].double() - exact).abs(); e2 = (g2[n].double() - exact).abs()
    scale = exact.abs().max().item()
    worst.append((max(e1.max().item(), e2.max().item()) / scale, n, e1.max().item() / scale, e2.max().item() / scale, scale))
    if "q_proj.lora_A" in n:
        i = 32
        fl = exact.flatten()
        print(f"{n} element 32: float64 {fl[i].item():.8g} one-rank {g1[n].flatten()[i].item():.8g} tp {g2[n].flatten()[i].item():.8g} scale {scale:.6g}")
worst.sort(reverse=True)
print("largest |error|/max|grad| per tensor (one-rank, tp):")
for w, n, a, b, s in worst[:8]:
    print(f"  {n.replace('base_model.model.model.', '')}: one-rank {a:.2e}  tp {b:.2e}  (max|g| {s:.4g})")

# The same model in float32 through PyTorch: how far float32 rounding alone moves the gradients.
def grads_in(dtype):
    m = tl.load_hf_dir(os.path.join(d, "model"), dtype)
    lv = {n: t.to(dtype).clone().requires_grad_(True) for n, t in ad.items()}
    tl.attach_lora(m, lv, meta["scale"])
    for key, (at, n_in) in meta["masks"].items():
        l, target = key.split(".")
        mod = m.get_submodule(tl.lora_module_path(int(l), target))
        mod.mask = torch.from_numpy(masks[at:at + B * T * n_in].astype(np.float64)).reshape(B, T, n_in).to(dtype)
        def fwd(self, x):
            a, b = self.lora
            return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x * self.mask, a), b)
        mod.forward = types.MethodType(fwd, mod)
    for p in m.parameters(): p.requires_grad_(False)
    _, l = m(tokens, targets)
    l.backward()
    return {n: t.grad.double() for n, t in lv.items()}
g32 = grads_in(torch.float32)
print("torch float32 vs float64, largest |error|/max|grad|:")
w32 = sorted(((g32[n] - t.grad).abs().max().item() / t.grad.abs().max().item(), n) for n, t in leaves.items())[::-1]
for e, n in w32[:4]: print(f"  {n.replace('base_model.model.model.', '')}: {e:.2e}")
print(f"torch float32 norm2 {sum(float((g**2).sum()) for g in g32.values()):.6f}")

# Conditioning: float64 gradients after nudging every weight and adapter by float32's unit
# roundoff (relative 2^-24, random sign): what rounding the inputs alone does, whatever the algorithm.
def grads_nudged(seed):
    gen = torch.Generator().manual_seed(seed)
    m = tl.load_hf_dir(os.path.join(d, "model"), torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + 2.0**-24 * (2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1))
    lv = {n: (t.double() * (1 + 2.0**-24 * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1))).requires_grad_(True) for n, t in ad.items()}
    tl.attach_lora(m, lv, meta["scale"])
    for key, (at, n_in) in meta["masks"].items():
        l, target = key.split(".")
        mod = m.get_submodule(tl.lora_module_path(int(l), target))
        mod.mask = torch.from_numpy(masks[at:at + B * T * n_in].astype(np.float64)).reshape(B, T, n_in)
        def fwd(self, x):
            a, b = self.lora
            return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x * self.mask, a), b)
        mod.forward = types.MethodType(fwd, mod)
    for p in m.parameters(): p.requires_grad_(False)
    _, l = m(tokens, targets)
    l.backward()
    return {n: t.grad for n, t in lv.items()}
print("per tensor, max|.| / max|g64|: nudged-float64 (x3 seeds, max) | tp - one-rank float32 | one-rank - float64")
rows = []
nudges = [grads_nudged(s) for s in range(3)]
for n, t in leaves.items():
    sc = t.grad.abs().max().item()
    nud = max((g[n] - t.grad).abs().max().item() for g in nudges) / sc
    diff = (g2[n].double() - g1[n].double()).abs().max().item() / sc
    err = (g1[n].double() - t.grad).abs().max().item() / sc
    rows.append((diff, n, nud, err))
for diff, n, nud, err in sorted(rows)[::-1][:8]:
    print(f"  {n.replace('base_model.model.model.', '')}: nudged {nud:.2e} | tp-one {diff:.2e} | one-f64 {err:.2e}")
