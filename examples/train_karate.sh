#!/usr/bin/env bash
# GCN (examples/gcn.mp) on Zachary's karate club, the standard semi-supervised split (--split karate-4:
# one labelled node per class, PyTorch Geometric's KarateClub train_mask, nodes 0, 4, 8, 24; the other
# 30 nodes are the test set), over 10 seeds: prints each seed's test accuracy, then mean +- std.
#
#     bash examples/train_karate.sh [EPOCHS]        # default 200 epochs, Adam lr 0.01, weight decay 5e-4
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-200}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for seed in 0 1 2 3 4 5 6 7 8 9; do
    mpdsl train examples/gcn.mp --data examples/data/karate.npz --split karate-4 --epochs "$epochs" \
        --lr 0.01 --weight-decay 5e-4 --seed "$seed" --log-every "$epochs" --no-progress \
        --history "$out/seed$seed.json" > "$out/seed$seed.log" 2>&1
done
python - "$out" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
runs = sorted(Path(sys.argv[1]).glob("seed*.json"), key=lambda p: int(p.stem[4:]))
accs = np.array([json.loads(p.read_text())["final"]["test_acc"] for p in runs])
for p, a in zip(runs, accs):
    print(f"{p.stem}: test_acc {a:.4f}")
print(f"GCN on karate-4, {len(accs)} seeds: test accuracy {accs.mean():.4f} +- {accs.std():.4f} "
      f"(min {accs.min():.4f}, max {accs.max():.4f}; std over seeds, ddof=0)")
EOF
