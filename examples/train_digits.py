"""Train a small CNN on scikit-learn's handwritten digits with SGD, Adam, KFAC and AdaHesScale.

Real data, no download: ``sklearn.datasets.load_digits`` (1,797 8×8 images, 10 classes), split
80/20 into training and test sets (stratified, fixed). Every method trains the same network from
the same initialisation for the same number of epochs and the same cosine learning-rate decay,
with the learning rate (and KFAC's damping) chosen on a validation split of the training set
(``--tune``). Runs on the CPU::

    python examples/train_digits.py            # full run (a few minutes): PNG + table
    python examples/train_digits.py --quick    # seconds: a subset, one epoch (used by the tests)
    python examples/train_digits.py --tune     # re-tune the learning rates on a validation split
    python examples/train_digits.py --overhead # wall time of KFAC steps without curvature vs SGD

Outputs (``--out``, default ``benchmarks/results/digits``): ``digits.png`` (training loss and test
accuracy per epoch and method, mean over seeds) and ``results.md`` (the printed table).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import time

import torch
from torch import nn
from tqdm import tqdm

from curvlib.optim import KFAC, AdaHesScale

#: learning rates (and KFAC damping) chosen by ``--tune``: best validation accuracy after the full
#: budget of epochs (mean over two seeds) on the grid below; scores in ``tuning.md``
SETTINGS = {
    "SGD": dict(lr=0.1),
    "Adam": dict(lr=0.01),
    "KFAC-expand": dict(lr=0.01, damping=1e-2),
    "KFAC-reduce": dict(lr=3e-3, damping=1e-2),
    "AdaHesScale": dict(lr=3e-4),
    # the schedule (factors every 10 steps, inverses every 50) with KFAC-reduce's settings
    "KFAC-reduce-f10": dict(lr=3e-3, damping=1e-2, factor_update_every=10, inverse_update_every=50),
}

GRID = {
    "SGD": [dict(lr=lr) for lr in (0.01, 0.03, 0.1, 0.3)],
    "Adam": [dict(lr=lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
    "KFAC-expand": [dict(lr=lr, damping=d) for lr in (0.003, 0.01, 0.03, 0.1) for d in (1e-3, 1e-2, 1e-1)],
    "KFAC-reduce": [dict(lr=lr, damping=d) for lr in (0.003, 0.01, 0.03, 0.1) for d in (1e-3, 1e-2, 1e-1)],
    "AdaHesScale": [dict(lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)],
}

#: KFAC's schedule (the same for both approximations): Monte-Carlo Fisher, factors every step,
#: inverses every 10 steps, KL clipping 1e-3; SGD with momentum 0.9 as the base optimizer, as for SGD
KFAC_OPTIONS = dict(fisher="mc", ema=0.95, factor_update_every=1, inverse_update_every=10, kl_clip=1e-3)


def load_data(seed: int = 0, subset: int = None):
    """``(X_train, y_train, X_test, y_test)`` as float32 tensors ``[N, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    if subset is not None:
        train_idx, test_idx = train_idx[:subset], test_idx[: max(subset // 4, 10)]
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def validation_split(X, y, seed: int = 1):
    """Hold out 20% of the training set (for tuning only)."""
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(range(len(y)), test_size=0.2, stratify=y.numpy(), random_state=seed)
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    return X[train_idx], y[train_idx], X[val_idx], y[val_idx]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),             # 16 × 8 × 8
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),  # 32 × 4 × 4
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),  # 32 × 2 × 2
        nn.Flatten(), nn.Linear(128, 10),
    )


def make_optimizer(method: str, settings: dict, model: nn.Module, loss_fn: nn.Module):
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=0.9)
    if method == "Adam":
        return torch.optim.Adam(model.parameters(), lr=settings["lr"])
    if method.startswith("KFAC"):
        base = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=0.9)
        approx = method.split("-")[1]
        options = dict(KFAC_OPTIONS)
        options.update({k: v for k, v in settings.items() if k.endswith("_every")})
        return KFAC(model, loss_fn, base, approx=approx, damping=settings["damping"], **options)
    if method == "AdaHesScale":
        return AdaHesScale(model, loss_fn, lr=settings["lr"])
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def accuracy(model, X, y) -> float:
    return (model(X).argmax(1) == y).float().mean().item()


def train(method, settings, data, epochs, seed, batch_size=64, progress=True, position=0):
    """Train from the seed's initialisation; per-epoch training loss, test accuracy, wall time."""
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = make_optimizer(method, settings, model, loss_fn)
    # the same cosine learning-rate decay for every method (schedulers act on KFAC's param groups too)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    history = {"loss": [], "accuracy": [accuracy(model, X_test, y_test)], "seconds": 0.0}
    bar = tqdm(range(epochs), desc=f"{method:12s} seed {seed}", disable=not progress, leave=False, position=position)
    for _ in bar:
        start = time.perf_counter()
        permutation = torch.randperm(len(y_train), generator=order)
        total, count = 0.0, 0
        for begin in range(0, len(y_train), batch_size):
            index = permutation[begin : begin + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(X_train[index]), y_train[index])
            loss.backward()
            try:
                opt.step()
            except ValueError as error:  # a diverged run's factors are no longer invertible
                print(f"{method} {settings} seed {seed}: diverged ({error})")
                total, count = float("nan"), 1
                break
            scheduler.step()
            total += loss.item() * len(index)
            count += len(index)
        history["seconds"] += time.perf_counter() - start
        history["loss"].append(total / count)
        history["accuracy"].append(accuracy(model, X_test, y_test))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{history['accuracy'][-1]:.3f}")
        if not math.isfinite(history["loss"][-1]):
            break  # diverged: the remaining epochs would only repeat nan
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return history


def _mean(curves):
    length = max(len(c) for c in curves)
    padded = [c + [float("nan")] * (length - len(c)) for c in curves]
    return [statistics.fmean(values) if all(math.isfinite(v) for v in values) else float("nan") for values in zip(*padded)]


def run(methods, settings, data, epochs, seeds, progress=True):
    results = {}
    for method in methods:
        runs = [train(method, settings[method], data, epochs, seed, progress=progress) for seed in seeds]
        results[method] = {
            "loss": _mean([r["loss"] for r in runs]),
            "accuracy": _mean([r["accuracy"] for r in runs]),
            "final": [r["accuracy"][-1] for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
    return results


#: the accuracy threshold of the "epochs to 96%" column
THRESHOLD = 0.96


def first_epoch_reaching(curve, target):
    for epoch, value in enumerate(curve):
        if value >= target - 1e-9:
            return epoch
    return None


def _fmt(epoch) -> str:
    return "not reached" if epoch is None else str(epoch)


def _at(curve, index) -> str:
    return f"{curve[index]:.3f}" if index < len(curve) else "–"


def table(results, epochs, seeds, settings) -> str:
    sgd_final = statistics.fmean(results["SGD"]["final"]) if "SGD" in results else None
    lines = [
        f"Digits (sklearn), small CNN, {epochs} epochs, batch 64, cosine learning-rate decay, mean over seeds {list(seeds)}; "
        f"test accuracy of the mean curve; SGD's final mean test accuracy: "
        f"{sgd_final:.4f}" if sgd_final is not None else "",
        "",
        "| method | settings | final test accuracy (mean ± sd) | epochs to SGD's final accuracy "
        f"| epochs to {THRESHOLD:.0%} | training loss after 1 / 5 epochs | wall time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        final = r["final"]
        sd = statistics.stdev(final) if len(final) > 1 else 0.0
        reach = first_epoch_reaching(r["accuracy"], sgd_final) if sgd_final is not None else None
        setting = ", ".join(f"{k.replace('_update_every', ' every')}={v:g}" for k, v in settings[method].items())
        lines.append(
            f"| {method} | {setting} | {statistics.fmean(final):.4f} ± {sd:.4f} | "
            f"{_fmt(reach)} | {_fmt(first_epoch_reaching(r['accuracy'], THRESHOLD))} | "
            f"{_at(r['loss'], 0)} / {_at(r['loss'], 4)} | "
            f"{statistics.fmean(r['seconds']):.1f} s |"
        )
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results.items():
        ax_loss.plot(range(1, len(r["loss"]) + 1), r["loss"], label=method)
        ax_acc.plot(range(len(r["accuracy"])), r["accuracy"], label=method)
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0.8, 1.0))
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tune(data, epochs, out, progress=True):
    """Grid search on a validation split of the training set; writes ``tuning.md``."""
    X_train, y_train, _, _ = data
    split = validation_split(X_train, y_train)
    chosen, lines = {}, ["| method | settings | validation accuracy (mean of seeds 100, 101) |", "|---|---|---|"]
    for method, grid in GRID.items():
        scores = []
        for settings in grid:
            runs = [train(method, settings, split, epochs, seed, progress=progress) for seed in (100, 101)]
            score = statistics.fmean(r["accuracy"][-1] if len(r["accuracy"]) == epochs + 1 else 0.0 for r in runs)
            scores.append(score)
            lines.append(f"| {method} | {json.dumps(settings)} | {score:.4f} |")
        chosen[method] = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]
    chosen["KFAC-reduce-f10"] = dict(chosen["KFAC-reduce"], factor_update_every=10, inverse_update_every=50)
    (out / "tuning.md").write_text("\n".join(lines) + f"\n\nchosen: {json.dumps(chosen)}\n")
    return chosen


def overhead(out, steps=200):
    """Median wall time of training steps: SGD vs KFAC steps that update no curvature vs KFAC curvature steps."""
    X, y, _, _ = load_data()
    torch.manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    batch = (X[:64], y[:64])

    def timed(opt, model, count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[5:] or times)

    model = make_model()
    sgd_model, kfac_model, update_model = model, copy.deepcopy(model), copy.deepcopy(model)
    lr, damping = SETTINGS["KFAC-expand"]["lr"], SETTINGS["KFAC-expand"]["damping"]
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr, momentum=0.9)
    options = dict(KFAC_OPTIONS, damping=damping, inverse_update_every=10**9)
    never = KFAC(kfac_model, loss_fn, torch.optim.SGD(kfac_model.parameters(), lr=lr, momentum=0.9),
                 **dict(options, factor_update_every=10**9))
    timed(never, kfac_model, 1)  # step 0 collects curvature once; every later step collects none
    always = KFAC(update_model, loss_fn, torch.optim.SGD(update_model.parameters(), lr=lr, momentum=0.9), **options)
    rows = []
    for repeat in range(3):  # interleaved repeats: the machine is shared
        rows.append((timed(sgd, sgd_model, steps), timed(never, kfac_model, steps), timed(always, update_model, steps // 4)))
    sgd_t = min(r[0] for r in rows)
    never_t = min(r[1] for r in rows)
    always_t = min(r[2] for r in rows)
    text = (
        f"Digits CNN, batch 64, CPU ({torch.get_num_threads()} threads), median step time (forward + backward + "
        f"step), best of 3 interleaved repeats of {steps} steps:\n\n"
        "| step | time | × SGD |\n|---|---|---|\n"
        f"| SGD (momentum 0.9) | {sgd_t * 1e3:.2f} ms | 1.00 |\n"
        f"| KFAC-expand, step without curvature update (cached inverses applied) | {never_t * 1e3:.2f} ms | {never_t / sgd_t:.2f} |\n"
        f"| KFAC-expand, step with factor update (MC, no inversion) | {always_t * 1e3:.2f} ms | {always_t / sgd_t:.2f} |\n"
    )
    (out / "overhead.md").write_text(text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 300 training images, 1 epoch, 1 seed")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "digits"))
    parser.add_argument("--tune", action="store_true", help="choose learning rates on a validation split first")
    parser.add_argument("--overhead", action="store_true", help="only measure the per-step overhead of KFAC")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.overhead:
        overhead(out)
        return None
    if args.quick:
        data, epochs, seeds = load_data(subset=300), 1, [0]
    else:
        data, epochs, seeds = load_data(), args.epochs, list(range(args.seeds))
    settings = dict(SETTINGS)
    if args.tune:
        settings = tune(data, epochs, out, progress)
    results = run(list(settings), settings, data, epochs, seeds, progress)
    text = table(results, epochs, seeds, settings)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    plot(results, out / "digits.png")
    print(f"wrote {out / 'digits.png'} and {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
