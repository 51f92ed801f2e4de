"""Fitting a KVzap surrogate to KVzip+ targets, and how well it predicts them on held-out documents.

The two surrogates of KVzap (arXiv 2601.07891), one module per layer mapping the layer's input
hidden state to one score per KV head, as kvpress's `KVzapModel` holds them:
- `linear`: ridge regression (alpha 1, intercept unpenalized: scikit-learn's `Ridge()`, which the
  kvpress recipe uses), solved in closed form in float64;
- `mlp`: Linear(hidden, hidden_dim), GELU, Linear(hidden_dim, KV heads), fitted with AdamW on the
  mean squared error, a cosine learning-rate schedule and gradient norms clipped to 1 (the
  recipe's skorch settings: 15 epochs, lr 5e-3, batches of 512).
"""

import sys

import numpy as np
import torch
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from scipy.stats import spearmanr
from tqdm import tqdm


def new_surrogate(features: torch.Tensor, targets: torch.Tensor, hidden_dim: int | None, seed: int) -> KVzapModel:
    """An untrained surrogate for features (N, layers, hidden) and targets (N, layers, KV heads)."""
    torch.manual_seed(seed)
    config = KVzapConfig(
        input_dim=features.shape[2], output_dim=targets.shape[2], n_modules=features.shape[1], hidden_dim=hidden_dim
    )
    return KVzapModel(config)


@torch.no_grad()
def fit_linear(features: torch.Tensor, targets: torch.Tensor, device: str, alpha: float = 1.0) -> KVzapModel:
    """Ridge regression per layer: W = (Xc'Xc + alpha I)^-1 Xc'yc on centred data, b = y_mean - x_mean W."""
    surrogate = new_surrogate(features, targets, None, seed=0)
    for layer, module in enumerate(tqdm(surrogate.layers, desc="fit linear", file=sys.stderr)):
        x = features[:, layer].to(device, torch.float64)
        y = targets[:, layer].to(device, torch.float64)
        x_mean, y_mean = x.mean(0), y.mean(0)
        x, y = x - x_mean, y - y_mean
        gram = x.T @ x + alpha * torch.eye(x.shape[1], device=device, dtype=torch.float64)
        weight = torch.linalg.solve(gram, x.T @ y)  # (hidden, KV heads)
        module.weight.copy_(weight.T.float().cpu())
        module.bias.copy_((y_mean - x_mean @ weight).float().cpu())
    return surrogate


def fit_mlp(
    features: torch.Tensor,
    targets: torch.Tensor,
    device: str,
    hidden_dim: int = 512,
    epochs: int = 15,
    learning_rate: float = 5e-3,
    batch_size: int = 512,
    seed: int = 0,
) -> KVzapModel:
    """Every layer's MLP at once (their losses add up, their parameters are disjoint), in float32."""
    surrogate = new_surrogate(features, targets, hidden_dim, seed).to(device).train()
    optimizer = torch.optim.AdamW(surrogate.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    if torch.device(device).type == "cuda":
        # On the GPU at once if they fit (the model is gone by now): one copy instead of one per step.
        try:
            features, targets = features.to(device), targets.to(device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    for _ in tqdm(range(epochs), desc="fit mlp (epochs)", file=sys.stderr):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            batch = batch.to(features.device)
            x = features[batch].to(device, torch.float32, non_blocking=True)
            y = targets[batch].to(device, torch.float32, non_blocking=True)
            loss = torch.nn.functional.mse_loss(surrogate(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(surrogate.parameters(), 1.0)
            optimizer.step()
        schedule.step()
    return surrogate.eval().cpu()


@torch.no_grad()
def predict(surrogate: KVzapModel, features: torch.Tensor, device: str, batch_size: int = 4096) -> torch.Tensor:
    surrogate = surrogate.to(device).eval()
    out = [surrogate(x.to(device, torch.float32)).float().cpu() for x in features.split(batch_size)]
    surrogate.cpu()
    return torch.cat(out)


def agreement(predicted: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """Per layer, over every (position, KV head) pair: R^2 of the predictions and their Spearman
    rank correlation with the targets (what eviction by threshold depends on: the order)."""
    rows = []
    for layer in range(targets.shape[1]):
        y = targets[:, layer].double().flatten().numpy()
        p = predicted[:, layer].double().flatten().numpy()
        residual, total = float(np.sum((y - p) ** 2)), float(np.sum((y - y.mean()) ** 2))
        rows.append(
            {
                "layer": layer,
                "r2": 1.0 - residual / total if total > 0 else float("nan"),
                "spearman": float(spearmanr(p, y).statistic),
            }
        )
    return rows
