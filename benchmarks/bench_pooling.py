"""Does the global alignment learn? [CLS] vs mean-pooled report embeddings, same data, same tiny towers.

    python -m benchmarks.bench_pooling [--data DIR] [--steps 80]

Generates a small synthetic set when --data is not given; trains the global loss only for each pooling and prints
the loss and the mean off-diagonal cosine of each tower's embeddings (1.0 = every sample embedded alike: collapse).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from plan_hf import PlanImageProcessor, PlanModel, PlanProcessor
from plan_hf.data import PlanCollator, load_mimic_cxr
from plan_hf.data.synthetic import generate_synthetic
from plan_hf.tiny import build_tokenizer, tiny_plan_config


def mean_off_diagonal_cosine(embeds: torch.Tensor) -> float:
    off = ~torch.eye(len(embeds), dtype=torch.bool)
    return (embeds @ embeds.T)[off].mean().item()


def run(pooling: str, batches: list[dict], vocab_size: int, steps: int, lr: float) -> list[tuple]:
    torch.manual_seed(0)
    model = PlanModel(tiny_plan_config(vocab_size=vocab_size, image_size=64, local_loss_weight=0.0,
                                       text_pooling=pooling)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            rows.append((step, out.loss_global.item(), mean_off_diagonal_cosine(out.text_embeds.detach()),
                         mean_off_diagonal_cosine(out.image_embeds.detach())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a MIMIC-CXR-style folder (default: generate 800 synthetic studies)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.data or tempfile.mkdtemp(prefix="plan-pooling-")
    if not args.data:
        generate_synthetic(data, 800, seed=0, image_size=128, contact_sheet=False)
    dataset = load_mimic_cxr(data, split="train")
    rows = [dataset[i] for i in range(min(512, len(dataset)))]
    tokenizer = build_tokenizer([r["text"] for r in rows])
    processor = PlanProcessor(image_processor=PlanImageProcessor(size=64), tokenizer=tokenizer, max_length=64)
    collate = PlanCollator(processor)
    batches = [collate([rows[i] for i in random.Random(s).sample(range(len(rows)), 32)]) for s in range(16)]
    for pooling in ("cls", "mean"):
        start = time.perf_counter()
        for step, loss, text_cos, image_cos in run(pooling, batches, len(tokenizer), args.steps, args.lr):
            print(f"{pooling:4s} step {step:3d} loss {loss:.3f} text cos {text_cos:.3f} image cos {image_cos:.3f}")
        print(f"{pooling}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
