"""2:4 speed on the GPU: dense bf16 against PyTorch's semi-structured sparse kernels.

    python benchmarks/bench_sparse.py                            # opt-1.3b and opt-6.7b shapes
    python benchmarks/bench_sparse.py --shapes opt-1.3b --backends cusparselt,cutlass

For each shape (random weights, magnitude-pruned to 2:4; speed does not depend on the values):
prefill tokens/s of the linear layers alone (one layer's matmuls at batch × 2048 tokens) and of the
whole model, decode tokens/s at batch 1 and 16 (one token a step over a KV cache), and the logits'
largest difference to the dense kernels on the same 2:4 weights. A backend that fails prints its
error and the rest goes on.
"""
from __future__ import annotations

import argparse

import torch

from common import bench_model, timed
from utils.models.structure import find_decoder_layers
from utils.pruning.driver import prune_model
from utils.export.semi_structured import to_semi_structured


def layer_prefill(layer, tokens: int) -> float:
    """Tokens/s through one decoder layer's linears alone (what 2:4 can speed up)."""
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(tokens, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears]

    def run():
        for linear, x in zip(linears, inputs):
            linear(x)
    return tokens / timed(run, repeats=10)


@torch.inference_mode()
def model_rates(model, batch: int, seq: int) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    rates = {"prefill": batch * seq / timed(lambda: model(ids, use_cache=False), repeats=5)}
    for decode_batch in (1, 16):
        prompt = torch.randint(0, model.config.vocab_size, (decode_batch, 128), device="cuda")

        def decode(steps: int = 32):
            out = model(prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        rates[f"decode@{decode_batch}"] = decode_batch * 32 / timed(decode, repeats=3)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="opt-1.3b,opt-6.7b")
    parser.add_argument("--backends", default="cusparselt,cutlass")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuSPARSELt "
          f"{getattr(torch.backends.cusparselt, 'version', lambda: None)()}", flush=True)
    for shape in args.shapes.split(","):
        model = bench_model(shape, torch.bfloat16)
        prune_model(model, "magnitude", 0.5, (2, 4), progress=False)
        layer = find_decoder_layers(model)[1][0]
        tokens = args.batch * args.seq
        dense_layer = layer_prefill(layer, tokens)
        dense = model_rates(model, args.batch, args.seq)
        ids = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
        with torch.inference_mode():
            reference = model(ids).logits.float()
        print(f"{shape} dense bf16: linears {dense_layer:,.0f} tokens/s | " + " | ".join(
            f"{k} {v:,.0f} tokens/s" for k, v in dense.items()), flush=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for index, backend in enumerate(args.backends.split(",")):
            if index:  # the previous backend swapped the weights: back to dense parameters
                model = bench_model(shape, torch.bfloat16)
                model.load_state_dict(state)
                layer = find_decoder_layers(model)[1][0]
            try:
                to_semi_structured(model, backend)
                sparse_layer = layer_prefill(layer, tokens)
                sparse = model_rates(model, args.batch, args.seq)
                with torch.inference_mode():
                    difference = (model(ids).logits.float() - reference).abs().max().item()
                print(f"{shape} 2:4 {backend}: linears {sparse_layer:,.0f} tokens/s ({sparse_layer / dense_layer:.2f}×) | "
                      + " | ".join(f"{k} {v:,.0f} ({v / dense[k]:.2f}×)" for k, v in sparse.items())
                      + f" | max |Δlogit| {difference:.3g}", flush=True)
            except Exception as error:  # noqa: BLE001 - a kernel missing on this stack is a result to record
                print(f"{shape} 2:4 {backend}: failed: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
        del model, state
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
