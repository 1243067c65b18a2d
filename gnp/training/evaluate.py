"""Evaluation on the test set: mean loss, error and top-5 error, summed over replicas."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp import distributed
from gnp.data import BatchLoader
from gnp.training.build import at_least_float32


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, autocast=nullcontext,
             channels_last: bool = False) -> dict[str, float]:
    """Mean cross-entropy, error (%) and, with more than 10 classes, top-5 error (%) on the loader's
    whole dataset, summed over replicas."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=loader.device, dtype=torch.float64)
    classes = 0
    for images, labels in loader.epoch():
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        classes = logits.shape[1]
        top5 = logits.topk(min(5, classes), dim=1).indices
        totals += torch.stack([F.cross_entropy(at_least_float32(logits), labels, reduction="sum").double(),
                               (logits.argmax(1) != labels).sum().double(),
                               (top5 != labels[:, None]).all(1).sum().double()])
    model.train(was_training)
    loss_sum, errors, top5_errors = distributed.all_reduce_sum(totals).tolist()
    images = len(loader.labels)
    result = {"loss": loss_sum / images, "error": 100 * errors / images}
    if classes > 10:
        result["top5_error"] = 100 * top5_errors / images
    return result
