"""Records torch.optim.AdamW trajectories that crates/linearize-train/tests/optim.rs replays.

Run from the repository root with the project's virtualenv:
    .venv/bin/python scripts/make_adamw_fixture.py
"""
import json
import pathlib

import torch

OUT = pathlib.Path("crates/linearize-train/tests/fixtures/adamw_torch.json")
STEPS = 5
CONFIGS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
]


def main():
    torch.manual_seed(0)
    cases = []
    for config in CONFIGS:
        initial = torch.randn(3, 4)
        grads = [torch.randn(3, 4) for _ in range(STEPS)]
        param = initial.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([param], foreach=False, fused=False, **config)
        after = []
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
            after.append(param.detach().flatten().tolist())
        cases.append(
            {
                "config": {**config, "betas": list(config["betas"])},
                "shape": list(initial.shape),
                "initial": initial.flatten().tolist(),
                "grads": [g.flatten().tolist() for g in grads],
                "after_each_step": after,
            }
        )
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
