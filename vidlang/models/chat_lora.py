"""LoRA adapters on the chat encoder's causal LM (``peft``), 8/4-bit loading (``bitsandbytes``), size reports.

* :func:`add_lora` wraps the LM in a ``peft`` model with LoRA on ``target_modules`` (names or suffixes of its
  linear layers, e.g. ``["q_proj", "v_proj"]``; ``"all-linear"`` for every linear layer but the output head); only
  the adapters train. :func:`save_adapter` / :func:`load_adapter` write and read the adapters alone (``peft``'s
  ``adapter_config.json`` + ``adapter_model.safetensors``); :func:`merge_lora` folds them into the weights
  (serving: one matmul per layer again).
* :func:`quantization_config`: ``bits`` 8 or 4 -> a ``BitsAndBytesConfig`` for ``from_pretrained`` (CUDA and
  ``bitsandbytes`` required: a clear error otherwise). A quantised LM is prepared for k-bit training before LoRA.
* :func:`size_report`: parameters (total / trainable / per part) and the bytes of weights, gradients and AdamW
  state, printed at the start of training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("LoRA needs the 'peft' package (pip install peft)") from err
    return peft


def is_lora(llm: nn.Module) -> bool:
    """Whether ``llm`` is a ``peft`` model (LoRA adapters attached)."""
    return hasattr(llm, "peft_config")


def add_lora(llm: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
             target_modules: str | Sequence[str] = ("q_proj", "v_proj")) -> nn.Module:
    """``llm`` with fresh LoRA adapters (B = 0: the output is unchanged until they train); only they train."""
    peft = _peft()
    if getattr(llm, "is_loaded_in_8bit", False) or getattr(llm, "is_loaded_in_4bit", False):
        llm = peft.prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = peft.LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(llm, cfg)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules {targets!r} match no layer of the LM ({err}); its linear layers "
                         f"are named {names}") from None


def load_adapter(llm: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """``llm`` (a plain LM) with the adapters saved in ``adapter_dir`` by :func:`save_adapter`."""
    peft = _peft()
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        raise FileNotFoundError(f"{adapter_dir}: no LoRA adapter here (missing {ADAPTER_CONFIG})")
    if is_lora(llm):
        raise ValueError("the LM already has LoRA adapters; load an adapter into the plain LM")
    return peft.PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)


def save_adapter(llm: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write the adapters of ``llm`` alone (not the LM's weights) to ``out_dir``."""
    if not is_lora(llm):
        raise ValueError("the LM has no LoRA adapters to save")
    llm.save_pretrained(str(out_dir))


def merge_lora(llm: nn.Module) -> nn.Module:
    """The plain LM with the adapters folded into its weights (``W + B A x alpha / r``)."""
    if not is_lora(llm):
        raise ValueError("the LM has no LoRA adapters to merge")
    return llm.merge_and_unload()


def quantization_config(bits: int | None) -> Any:
    """``None`` for full precision; for 8 or 4 bits a ``transformers.BitsAndBytesConfig`` (CUDA needed)."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"llm_bits must be 4, 8 or null, got {bits}")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{bits}-bit loading of the LLM (bitsandbytes) needs a CUDA GPU; none is available")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{bits}-bit loading of the LLM needs the 'bitsandbytes' package") from err
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _bytes(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def size_report(module: nn.Module, parts: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """Parameter counts and memory of ``module``: ``total`` / ``trainable`` parameters, ``weights_bytes`` (as
    stored: 1 byte per 8-bit weight), ``grad_bytes`` and ``adam_bytes`` (two fp32 moments) of the trainable ones,
    ``train_bytes`` their sum; ``parts``: name -> submodule for per-part counts (total, trainable)."""
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    out: dict[str, Any] = {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "weights_bytes": _bytes(params),
        "grad_bytes": _bytes(trainable),
        "adam_bytes": 8 * sum(p.numel() for p in trainable),
    }
    out["train_bytes"] = out["weights_bytes"] + out["grad_bytes"] + out["adam_bytes"]
    out["parts"] = {name: {"total": sum(p.numel() for p in m.parameters()),
                           "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}
                    for name, m in (parts or {}).items() if m is not None}
    return out


def format_size_report(report: dict[str, Any]) -> str:
    """A few lines for the start of training."""
    mib = 1 << 20
    lines = [f"chat encoder: {report['total']:,} parameters, {report['trainable']:,} trainable "
             f"({100 * report['trainable'] / max(report['total'], 1):.3g}%)",
             f"  memory: weights {report['weights_bytes'] / mib:.1f} MiB + grads {report['grad_bytes'] / mib:.1f} MiB "
             f"+ AdamW state {report['adam_bytes'] / mib:.1f} MiB = {report['train_bytes'] / mib:.1f} MiB "
             "(before activations)"]
    for name, c in report.get("parts", {}).items():
        lines.append(f"  {name}: {c['total']:,} parameters, {c['trainable']:,} trainable")
    return "\n".join(lines)
