"""Stage 2's resident memory as the number of users grows: does it follow the store (O(users x (history + m +
pool))) or the chunks' transients (O(chunk x items)), and how much is the C allocator's heap growth?

    python benchmarks/pdrec_memory.py --dataset sports [--users 2560 10240] [--out results.json]
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/pdrec_memory.py ...   # large blocks mapped, returned on free

Each size runs stage 2 over the first N users (an untrained TI-DiffRec of the authors' size, as in
``pdrec_cost.py``) and reports the kernel's resident peak above where the process stood before it.
"""

import argparse
import os

import torch
from common import build, report
from pdrec_cost import peak_rss

from recbole_diff import get_model
from recbole_diff.config import stage_config
from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import TrainingItems, compute_preference_store


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--users", type=int, nargs="+", default=[2560, 10240])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config, _, train, _, _ = build("PDRec", args.dataset, backbone="SASRec", dpa_m=50)
    ds = train.dataset
    sub = stage_config(config, "TIDiffRec", {"dims_dnn": [1000], "mask_history": True})
    torch.manual_seed(0)
    tidiffrec = get_model("TIDiffRec")(sub, ds).eval()
    training = TrainingItems.from_pairs(*training_interactions(ds), ds.user_num, ds.item_num)
    out = {
        "dataset": args.dataset,
        "items": ds.item_num,
        "chunk": args.chunk,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "peak_rss_mb": {},
    }
    with torch.no_grad():
        for n in args.users:
            part = TrainingItems(
                n, training.n_items, training.offsets[: n + 1], training.items[: int(training.offsets[n])]
            )
            with peak_rss(out["peak_rss_mb"], str(n)):
                store = compute_preference_store(tidiffrec.preferences, part, 50, 0.5, batch_size=args.chunk)
            out.setdefault("store_mb", {})[str(n)] = store.nbytes() / 2**20
    report(out, args.out)


if __name__ == "__main__":
    main()
