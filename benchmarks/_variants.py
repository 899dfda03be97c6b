import sys, time, torch; sys.path.insert(0, '.'); sys.path.insert(0, 'benchmarks')
from common import opt_model, forward_flops_per_token
dev = torch.device("cuda", 0)
def run(name, shape, compile_layers, steps=10, masks=False):
    model = opt_model(shape, torch.float32)
    fpt = 3 * forward_flops_per_token(model, 512)
    t0 = time.perf_counter()
    if compile_layers:
        for layer in model.model.decoder.layers: layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ps = [p for n, p in model.named_parameters() if p.ndim == 2 and "layers" in n]
    ms = [(torch.rand_like(p) < 0.1).float() for p in ps]
    model.train()
    data = torch.randint(0, 50272, (steps + 3, 8, 512), device=dev)
    def step(b):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=b, labels=b, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        if masks: torch._foreach_mul_(ps, ms)
    for i in range(3): step(data[i])
    torch.cuda.synchronize(); warm = time.perf_counter() - t0; t = time.perf_counter()
    for i in range(steps): step(data[3 + i])
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
    print(f"{name:34} {dt*1000:8.1f} ms/step {8*512/dt:10,.0f} tok/s MFU {fpt*8*512/dt/790e12*100:5.1f}% warmup {warm:5.1f}s", flush=True)
for shape in ["opt-350m", "opt-1.3b"]:
    run(f"{shape} plain", shape, False)
    run(f"{shape} compiled layers", shape, True)
    run(f"{shape} compiled layers + masks", shape, True, masks=True)
