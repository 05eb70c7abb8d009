"""Shipped adapters: their training recipes, where they live, and the benchmark that grades them.

``load_adapter("smollm2-135m", "biography")`` returns the trained ``PacketWrapper`` shipped in
``data/adapters/<model>/<dataset>-seed<k>/wrapper.safetensors``. ``python -m kvp.adapters train``
re-trains every recipe (the command each adapter's README line quotes); ``python -m kvp.adapters
evaluate`` writes the table of issue "adapter training" (``data/adapters/results.csv``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvp.train import TrainConfig

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "data" / "adapters"

# Context sizes the 135M/0.5B models handle on a CPU: NIAH at ~1.5K tokens in ≤1000-char chunks.
NIAH_OPTIONS = {"context_tokens": 1536, "chunk_chars": 1000}
NIAH_TRAIN_OPTIONS = {"context_tokens": 1536, "chunk_chars": 1000, "variant": "single"}

RECIPES: dict[tuple[str, str], TrainConfig] = {
    ("smollm2-135m", "biography"): TrainConfig(
        model="smollm2-135m", dataset="biography", n_samples=256, num_docs=(2, 3, 5, 7),
        epochs=10, lr=1e-3, batch_size=32, max_new_tokens=16, checkpoint_every=10),
    ("smollm2-135m", "niah"): TrainConfig(
        model="smollm2-135m", dataset="niah", n_samples=256, dataset_options=NIAH_TRAIN_OPTIONS,
        epochs=10, lr=1e-3, batch_size=32, max_new_tokens=16, checkpoint_every=10),
    ("smollm2-135m", "mixture"): TrainConfig(
        model="smollm2-135m", dataset="mixture", n_samples=256,
        dataset_options={"components": {"biography": 128, "niah": 128},
                         "options": {"biography": {"num_docs": 5}, "niah": NIAH_TRAIN_OPTIONS}},
        epochs=10, lr=1e-3, batch_size=32, max_new_tokens=16, checkpoint_every=10),
    ("qwen2.5-coder-0.5b", "biography"): TrainConfig(
        model="qwen2.5-coder-0.5b", dataset="biography", n_samples=64, num_docs=(2, 3, 5, 7),
        epochs=3, lr=1e-3, batch_size=16, max_new_tokens=16, checkpoint_every=2),
}


def adapter_dir(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR) -> Path:
    return root / model.replace("/", "__") / f"{dataset}-seed{seed}"


def load_adapter(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR):
    """The shipped wrapper for (model, dataset, seed); a clear error lists what is shipped."""
    from kvp.packet import PacketWrapper

    path = adapter_dir(model, dataset, seed, root) / "wrapper.safetensors"
    if not path.exists():
        shipped = sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/wrapper.safetensors"))
        raise FileNotFoundError(f"no adapter for model={model!r}, dataset={dataset!r}, seed={seed} "
                                f"at {path}; shipped: {shipped or 'none'}. Train one with: "
                                f"python -m kvp.adapters train --model {model} --dataset {dataset}")
    return PacketWrapper.load(path, model_name=model)


def recipe(model: str, dataset: str, seed: int = 0) -> TrainConfig:
    if (model, dataset) not in RECIPES:
        raise ValueError(f"no recipe for ({model!r}, {dataset!r}); recipes: {sorted(RECIPES)}")
    base = RECIPES[(model, dataset)]
    return TrainConfig(**{**base.to_dict(), "seed": seed})


def train_recipe(model_name: str, dataset: str, seeds: list[int], root: Path, device=None,
                 plot: bool = True) -> None:
    """Train the recipe for each seed into ``adapter_dir``; each run writes its README line."""
    from kvp.models import load_model
    from kvp.train import train

    model, tokenizer, spec = load_model(model_name, device=device, dtype="float32")
    spec.require_trained()
    for seed in seeds:
        config = recipe(model_name, dataset, seed)
        out = adapter_dir(model_name, dataset, seed, root)
        result = train(model, tokenizer, config, out, plot=plot)
        (out / "checkpoint.pt").unlink(missing_ok=True)  # optimiser state: not shipped
        command = (f"python -m kvp.adapters train --model {model_name} --dataset {dataset} "
                   f"--seeds {seed}")
        (out / "config.json").write_text(json.dumps({**result.record, "command": command},
                                                    indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train or evaluate the shipped adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train recipes into data/adapters")
    tr.add_argument("--model", default="smollm2-135m")
    tr.add_argument("--dataset", required=True, choices=sorted({d for _, d in RECIPES}))
    tr.add_argument("--seeds", type=int, nargs="+", default=[0])
    tr.add_argument("--root", type=Path, default=ADAPTER_DIR)
    tr.add_argument("--device", default=None)
    tr.add_argument("--no-plot", action="store_true", help="skip loss figures (draw them later)")
    pl = sub.add_parser("plot", help="draw the loss figure of every adapter under --root")
    pl.add_argument("--root", type=Path, default=ADAPTER_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        train_recipe(args.model, args.dataset, args.seeds, args.root, args.device,
                     plot=not args.no_plot)
    elif args.command == "plot":
        from kvp.train import plot_loss

        for csv in sorted(args.root.glob("*/*/loss.csv")):
            plot_loss(csv.parent, title=f"{csv.parent.parent.name} · {csv.parent.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
