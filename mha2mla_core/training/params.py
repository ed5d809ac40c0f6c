"""Which parameters train, and a guard against training tensors the teacher also uses."""

from __future__ import annotations

from torch import nn


def trainable_names(model: nn.Module, trainable: str) -> set[str]:
    """Parameter names that `trainable` selects: all, those under `self_attn.`, or those plus the norms."""
    def wanted(name: str) -> bool:
        if trainable == "all" or "self_attn." in name:
            return True
        return trainable == "attention+norms" and "norm" in name.rsplit(".", 2)[-2]

    names = {name for name, _ in model.named_parameters() if wanted(name)}
    if not names:
        raise ValueError(f"trainable={trainable!r} selects no parameter of {type(model).__name__}")
    return names


def set_trainable(model: nn.Module, trainable: str) -> int:
    """Freeze all but the chosen parameters; returns how many elements train."""
    names = trainable_names(model, trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_not_shared(student: nn.Module, teacher: nn.Module, trained: set[str]) -> None:
    """Refuse to train student tensors that are also the teacher's (training would move the teacher)."""
    teacher_tensors = {p.data_ptr() for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if n in trained and p.data_ptr() in teacher_tensors]
    if shared:
        raise ValueError(
            f"the student shares {len(shared)} trained tensors with the teacher (e.g. {shared[0]}): training would "
            f"change the teacher too. convert_to_mla reuses the source's embeddings, MLPs, norms and o_proj; "
            f"convert copy.deepcopy(source) and keep the source as the teacher"
        )
