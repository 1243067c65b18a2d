"""The Hessian of each top-level block of a model, its largest eigenvalue and its trace, as numbers
and as a bar chart.

A block's Hessian is the diagonal block H_bb of the whole Hessian: the loss as a function of the
block's parameters with the others held fixed. Its product with v is the product of the whole
Hessian with v padded with zeros outside the block, of which the block's components are kept.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from gnp.analysis import hessian  # noqa: E402
from gnp.analysis.objective import SubsetLoss, Vector, flat_hvps  # noqa: E402
from gnp.figures import save_figure  # noqa: E402

OWN = "(model)"  # the block of the parameters a model holds itself (ViT's cls_token and pos_embed)
CONTAINERS = (nn.Sequential, nn.ModuleList)
# Blocks this small get their exact Hessian, one product per parameter: no more than ARPACK's first
# 20 Lanczos vectors would cost.
DENSE_UP_TO = 20
DEFINITION = ("the model's named children that hold trainable parameters, a child that is a plain container "
              "(nn.Sequential, nn.ModuleList) replaced by its own children; the parameters the model holds "
              f"itself form the block {OWN}")


def top_level_blocks(model: nn.Module, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Block name -> its parameters among `params` (in their order), by DEFINITION: ResNet-18's conv1,
    bn1, its eight residual blocks layers.0 to layers.7 and fc; a ViT's patch_embed, blocks.0, ...,
    norm and head, and (model) for cls_token and pos_embed."""
    modules = {}
    for name, child in model.named_children():
        if isinstance(child, CONTAINERS):
            modules.update((f"{name}.{inner}", grandchild) for inner, grandchild in child.named_children())
        else:
            modules[name] = child
    owner = {id(p): OWN for p in model.parameters(recurse=False)}
    for name, module in modules.items():
        owner.update((id(p), name) for p in module.parameters())
    blocks: dict[str, list[torch.Tensor]] = {}
    for p in params:
        blocks.setdefault(owner[id(p)], []).append(p)
    return blocks


class BlockLoss:
    """The loss as a function of `params` (some of `loss.params`), the rest held fixed: the
    interface of SubsetLoss that gnp.analysis.hessian uses, for the block's Hessian."""

    def __init__(self, loss: SubsetLoss, params: list[torch.Tensor]):
        self.loss = loss
        inside = {id(p) for p in params}
        self.inside = [id(p) in inside for p in loss.params]
        self.params = [p for p, i in zip(loss.params, self.inside) if i]

    @property
    def hvp_count(self) -> int:
        return self.loss.hvp_count

    def hvp(self, vector: Vector) -> Vector:
        return self.hvps([vector])[0]

    def hvps(self, vectors: list[Vector]) -> list[Vector]:
        """The products of the whole Hessian with each vector padded by zeros, cut back to the block."""
        padded = []
        for vector in vectors:
            pieces = iter(vector)
            padded.append([next(pieces) if i else torch.zeros_like(p) for p, i in zip(self.loss.params, self.inside)])
        return [[h for h, i in zip(product, self.inside) if i] for product in self.loss.hvps(padded)]


def per_block(loss: SubsetLoss, model: nn.Module, trace_method: str, trace_samples: int, lanczos_seed: int,
              trace_seed: int) -> dict:
    """Each block's largest Hessian eigenvalue (Lanczos) and trace (`trace_method` with `trace_samples`
    products, hessian.trace); exact for a block of DENSE_UP_TO parameters or fewer."""
    rows = []
    for name, params in top_level_blocks(model, loss.params).items():
        block = BlockLoss(loss, params)
        start, size = loss.hvp_count, sum(p.numel() for p in params)
        if size <= DENSE_UP_TO:
            eigenvalues = np.linalg.eigvalsh(_dense(block, size))
            row = {"top_eigenvalue": float(eigenvalues[-1]), "residual": 0.0, "trace": float(eigenvalues.sum()),
                   "trace_stderr": 0.0, "exact": True}
        else:
            top = hessian.top_eigenvalues(block, 1, lanczos_seed)
            trace = hessian.trace(block, trace_method, trace_samples, trace_seed)
            row = {"top_eigenvalue": top["values"][0] if top["values"] else None,
                   "residual": top["residuals"][0] if top["values"] else None,
                   "trace": trace["value"], "trace_stderr": trace["stderr"], "exact": False}
        rows.append({"name": name, "parameters": size, **row, "hvp_count": loss.hvp_count - start})
    return {"definition": DEFINITION, "trace_method": trace_method, "trace_samples": trace_samples, "blocks": rows,
            "hvp_count": sum(r["hvp_count"] for r in rows)}


def _dense(block: BlockLoss, size: int) -> np.ndarray:
    """The block's Hessian, one column per product with a unit vector (symmetrised)."""
    like = block.params
    unit = torch.eye(size, device=like[0].device, dtype=like[0].dtype)
    columns = [flat_hvps(block, unit[i:i + 1])[0] for i in range(size)]
    matrix = torch.stack(columns, dim=1).to(torch.float64).cpu().numpy()
    return (matrix + matrix.T) / 2


# --- figure --------------------------------------------------------------------------------------

def plot_blocks(stem, title: str, result: dict) -> list:
    """Two bar charts over the blocks (named with their parameters), in the model's order: the largest
    eigenvalue, and the trace with its standard error."""
    rows = result["blocks"]
    names = [f"{r['name']} ({r['parameters']:,})" for r in rows]
    x = np.arange(len(rows))
    fig, (top, trace) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 6), sharex=True)
    top.bar(x, [np.nan if r["top_eigenvalue"] is None else r["top_eigenvalue"] for r in rows], color="C0")
    top.set_ylabel("largest eigenvalue of H_bb")
    trace.bar(x, [r["trace"] for r in rows], yerr=[r["trace_stderr"] for r in rows], color="C1", capsize=2)
    trace.set_ylabel("trace of H_bb")
    trace.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    for ax in (top, trace):
        ax.grid(alpha=0.3, axis="y")
        ax.axhline(0, color="0.3", linewidth=0.6)
    fig.suptitle(f"{title}\nthe Hessian of each top-level block (its diagonal block H_bb); trace: "
                 f"{result['trace_method']}, {result['trace_samples']} products, bars ± one standard error", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)
