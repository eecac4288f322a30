"""Which tokens a top-k loss compares the student and the teacher on, per position.

"Rethinking OPD" (Li et al. 2026) finds OPD works through a small shared set of high-probability
tokens; the token set decides which of them the loss sees: the teacher's top-k (what the teacher
would say: mode-covering), the student's own top-k (where the student puts its mass: the tokens a
reverse KL is about), or their union. The student's top-k comes from the rollout engine, the
teacher's log-probs at those ids from a scoring request naming them (SGLang's ``token_ids_logprob``).

A union slot whose id is already among the teacher's top-k carries teacher log-prob ``-inf``: the
losses in ``vocab_parallel`` leave such slots out, so every id of the set counts once.
"""

from __future__ import annotations

import torch

TOKEN_SETS = ("teacher", "student", "union")


def ids_to_score(student_top_ids: torch.Tensor) -> list[int]:
    """The distinct ids of a sample's student top-k [T, k]: what one teacher request asks log-probs for
    at every position (SGLang takes one id list per sequence)."""
    return sorted(set(student_top_ids.reshape(-1).tolist()))


def teacher_at(scored_ids: list[int], scored_logprobs: torch.Tensor, student_top_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs [T, k] at the student's top-k ids [T, k], picked from its answer for
    ``scored_ids`` at every position (``scored_logprobs`` [T, len(scored_ids)])."""
    column = {token: j for j, token in enumerate(scored_ids)}
    index = torch.tensor([[column[t] for t in row] for row in student_top_ids.tolist()], dtype=torch.long)
    return scored_logprobs.gather(-1, index.view(student_top_ids.shape))


def token_set(mode: str, teacher_ids: torch.Tensor, teacher_lp: torch.Tensor, student_ids: torch.Tensor | None,
              teacher_lp_at_student: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, teacher log-probs) of the set [T, m]: ``teacher`` -> its top-k (m = k); ``student`` -> the
    student's top-k (m = k_s); ``union`` -> both (m = k + k_s; duplicates of teacher ids at -inf)."""
    if mode == "teacher":
        return teacher_ids, teacher_lp
    if student_ids is None or teacher_lp_at_student is None:
        raise ValueError(f"token set {mode!r} needs the student's top-k ids and the teacher's log-probs at them")
    if mode == "student":
        return student_ids, teacher_lp_at_student
    if mode == "union":
        duplicate = (student_ids[:, :, None] == teacher_ids[:, None, :]).any(-1)
        at_student = teacher_lp_at_student.masked_fill(duplicate, float("-inf"))
        return torch.cat([teacher_ids, student_ids], -1), torch.cat([teacher_lp, at_student], -1)
    raise ValueError(f"unknown token set {mode!r}; expected one of {TOKEN_SETS}")
