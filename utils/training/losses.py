"""Training losses: weighted terms summed into one objective (cross-entropy on the text,
distillation from the dense model, hidden-state distillation), compiled with the model.

    loss = LossCfg(terms=(LossTerm("ce", 0.25), LossTerm("kd", 2.0)), temperature=1.0)  # utils/config/sections.py
    objective = TrainingObjective(student, teacher, loss)   # teacher: the frozen dense model, or None
    value = objective(input_ids)                              # (batch, seq) → scalar; what train_step calls
    describe(loss)                                            # "0.25 × cross-entropy + 2 × distillation ..."

The objective is a module so that `torch.compile` traces the teacher's forward, the student's
forward and the loss as one graph (one CUDA graph with reduce-overhead).  It is never saved:
state dicts, masks and evaluation use the student itself.

Distillation is the forward KL divergence KL(teacher ‖ student) of the next-token distributions
at temperature T, scaled by T² (Hinton et al.), averaged over the predicted positions; measured
at density 0.1 it recovered 1.57× lower perplexity than cross-entropy on equal tokens.
Hidden-state distillation ("SquareHead", Kurtic et al. 2023): per decoder layer, the mean squared
difference of student and teacher outputs normalized by the teacher's mean square, averaged over
layers; it needs the teacher too, also beside plain cross-entropy.

A new term is one entry of TERMS (and one flag for its weight, utils/config/validate.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils.config.sections import LossCfg


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (batch, seq, vocab) already aligned with targets (batch, seq)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of T² · KL(softmax(teacher/T) ‖ softmax(student/T)), in float32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)  # (batch, seq)
    return per_position.mean() * temperature ** 2


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SquareHead: the mean over layers of MSE(student, teacher) / mean(teacher²), in float32;
    each tuple holds the layers' outputs, (batch, seq, hidden) each."""
    terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
             for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class Outputs:
    """What a term reads of one batch: the student's outputs and, where the loss has a teacher, its own."""
    logits: torch.Tensor  # (batch, seq-1, vocab), aligned with targets
    targets: torch.Tensor  # (batch, seq-1)
    hidden: tuple[torch.Tensor, ...] | None  # the decoder layers' outputs, when a term reads them
    teacher_logits: torch.Tensor | None = None
    teacher_hidden: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class Term:
    compute: Callable[[Outputs, float], torch.Tensor]  # (outputs, temperature) → scalar
    teacher: bool  # reads the teacher's outputs
    hidden_states: bool  # reads every decoder layer's output
    # Above this many passes over the training text, the run is warned that it memorizes: with a
    # cross-entropy term "a few"; pure distillation was measured to memorize later (SmolLM2-135M,
    # docs/benchmark-log.md "Recovery over the full budget": its held-out loss still fell after 11.9 passes
    # over 2.15M tokens and after 20 over 254k, and rose by 40 passes).
    memorization_passes: float
    words: str  # how the run describes it beside other terms
    alone: str = ""  # ... and what it adds when it is the only main term
    # Optional terms join any --loss by a weight flag of their own (0 = off); ce and kd are --loss's.
    flag: str | None = None
    help: str = ""

    @property
    def dest(self) -> str:
        """The flag's argparse name."""
        return self.flag.lstrip("-").replace("-", "_")


TERMS: dict[str, Term] = {
    "ce": Term(lambda out, t: cross_entropy(out.logits, out.targets), False, False, 4,
               "cross-entropy", " on the training text"),
    "kd": Term(lambda out, t: kd_divergence(out.logits, out.teacher_logits, t), True, False, 20,
               "distillation from the dense model (KL, temperature {t:g})"),
    # hidden_states[0] is the embedding output; the decoder layers' outputs follow
    "hidden": Term(lambda out, t: hidden_mse(out.hidden[1:], out.teacher_hidden[1:]), True, True, 20,
                   "hidden-state distillation (SquareHead)", flag="--kd-hidden-weight",
                   help="weight of hidden-state distillation (SquareHead: each decoder layer's output matched "
                        "to the dense model's, normalized MSE); 0 = off; works beside any --loss"),
}


def optional_terms() -> list[Term]:
    """The terms that join any --loss by their own weight flag."""
    return [term for term in TERMS.values() if term.flag]


def describe(loss: LossCfg) -> str:
    """The objective in words: "1 × cross-entropy + 1 × distillation from the dense model (...)"."""
    main = [(term, TERMS[term.name]) for term in loss.terms if not TERMS[term.name].flag]
    words = [entry.words.format(t=loss.temperature) for _, entry in main]
    text = " + ".join(f"{term.weight:g} × {w}" for (term, _), w in zip(main, words)) if len(main) > 1 else \
        words[0] + main[0][1].alone if main else ""
    return text + "".join(f" + {term.weight:g} × {TERMS[term.name].words}" for term in loss.terms
                          if TERMS[term.name].flag)


def needs_teacher(loss: LossCfg) -> bool:
    """Whether a term of `loss` reads the dense model's outputs."""
    return any(TERMS[term.name].teacher for term in loss.terms)


def memorization_passes(loss: LossCfg) -> float:
    """How many passes over the training text this loss takes before it memorizes (its terms' least)."""
    return min(TERMS[term.name].memorization_passes for term in loss.terms)


def loss_record(loss: LossCfg) -> dict:
    """The loss as results.json and best/pruning.json record it."""
    given = dict(loss.given)
    return {"kind": loss.kind, "temperature": loss.temperature, "ce_weight": given.get("ce", loss.weight("ce")),
            "kd_weight": given.get("kd", loss.weight("kd")), "hidden_weight": loss.weight("hidden") or 0.0}


class TrainingObjective(nn.Module):
    """input_ids → the training loss of `student`: its terms summed in order, each weighted."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: LossCfg):
        super().__init__()
        if needs_teacher(loss) and teacher is None:
            raise ValueError(f"loss {describe(loss)} needs a teacher model")
        self.student, self.loss = student, loss
        self.terms = [(TERMS[term.name], term.weight) for term in loss.terms]
        self.teacher = teacher if needs_teacher(loss) else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = any(term.hidden_states for term, _ in self.terms)
        out = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        outputs = Outputs(out.logits[:, :-1], input_ids[:, 1:], out.hidden_states if hidden else None,
                          teacher.logits[:, :-1] if teacher is not None else None,
                          teacher.hidden_states if teacher is not None and hidden else None)
        value = torch.zeros((), device=outputs.logits.device)
        for term, weight in self.terms:
            value = value + weight * term.compute(outputs, self.loss.temperature)
        return value

    def train(self, mode: bool = True) -> "TrainingObjective":
        """The student follows `mode`; the teacher always stays in eval mode (no dropout)."""
        self.training = mode
        self.student.train(mode)
        return self
