"""Does a trained GlobalDiff's diffusion output use what it is given: the backbone's y and the condition?

For the test users of a saved GlobalDiff checkpoint, x0_hat is computed as the ensemble computes it, then again
with each input taken from another user (the batch rolled by one) while the other input stays:

* ``y_swap_top10``: the share of x0_hat's top-10 items kept when y is another user's (1.0: y is ignored);
* ``cond_swap_top10``: the same with another user's condition;
* ``users_top10``: the share of top-10 items two users' x0_hat have in common (1.0: one list for everyone);
* ``ensemble_vs_backbone_top10``: the share of the backbone's top-10 the ensemble keeps (1.0: no vote);
* ``popularity_top10``: the share of x0_hat's top-10 among the 10 most frequent training items.

    python benchmarks/globaldiff_signal.py <saved GlobalDiff .pth> [--batches 4] [--out results.json]
        [--y-forms softmax topk:50 topk:240 logits] [--evaluate]

``--y-forms`` probes the same trained model with each form of y (an inference setting), and ``--evaluate``
adds the test HR@10 / NDCG@10 of the ensemble and of the diffusion model alone under each.
"""

import argparse

import torch
from common import report


def shared_top(a, b, k=10):
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return (top_a[:, :, None] == top_b[:, None, :]).any(-1).float().mean().item()


@torch.no_grad()
def probe(model, inter, popular):
    lens = inter[model.ITEM_SEQ_LEN]
    logits, states = model.adapter.scores_and_states(inter)
    cond = model.condition_from_states(states, lens - 1, lens)
    y = torch.softmax(logits.double(), dim=-1)
    x = model.diffusion_input(logits, y)

    def denoise(x_in, c):  # the same noise for every variant, so only the swapped input differs
        return model.denoise_scores(x_in, c, torch.Generator(device=x_in.device).manual_seed(model.eval_seed))

    own = denoise(x, cond)
    other_y = denoise(x.roll(1, dims=0), cond)
    other_c = own if cond is None else denoise(x, cond.roll(1, dims=0))
    fused = model.full_sort_predict(inter)
    if model.filter_history:  # the ensemble's ranking drops history items; compare with the backbone's that does
        logits = logits.masked_fill(model._history_mask(inter[model.ITEM_SEQ], logits.shape[1]), float("-inf"))
    pop = torch.zeros_like(own, dtype=torch.bool)
    pop[:, popular] = True
    return {
        "y_swap_top10": shared_top(own, other_y),
        "cond_swap_top10": shared_top(own, other_c),
        "users_top10": shared_top(own, own.roll(1, dims=0)),
        "ensemble_vs_backbone_top10": shared_top(fused, logits),
        "popularity_top10": pop.gather(1, own.topk(10, dim=1).indices).float().mean().item(),
    }


def measure(model, test, popular, batches):
    rows = []
    for i, batch in enumerate(test):
        if i >= batches:
            break
        rows.append(probe(model, batch[0], popular))
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def evaluate(config, model, test):
    from recbole_diff import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    out = {}
    for mode in ("ensemble", "diffusion_only", "backbone"):
        with model.evaluating(mode):
            result = trainer.evaluate(test, load_best_model=False)
        out[f"{mode}_test"] = {m: result[m] for m in ("hit@10", "ndcg@10")}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--y-forms", nargs="*", default=None, help="e.g. softmax topk:240 logits")
    parser.add_argument("--evaluate", action="store_true")
    args = parser.parse_args()

    from recbole_diff.quick_start import load_data_and_model

    config, model, _, train, _, test = load_data_and_model(args.checkpoint)
    model.eval()
    counts = torch.bincount(torch.as_tensor(train.dataset.inter_feat[model.ITEM_ID]), minlength=model.n_items)
    counts[0] = 0
    popular = counts.topk(10).indices
    out = measure(model, test, popular, args.batches)
    if args.evaluate:
        out.update(evaluate(config, model, test))
    for form in args.y_forms or []:
        model.y_form, _, k = form.partition(":")
        model.y_topk = int(k) if k else model.y_topk
        out[f"y_form={form}"] = measure(model, test, popular, args.batches)
        if args.evaluate:
            out[f"y_form={form}"].update(evaluate(config, model, test))
    out.update(
        checkpoint=args.checkpoint,
        batches=min(args.batches, len(test)),
        config={
            k: config[k]
            for k in ("diffusion_loss", "y_form", "y_scale", "x0_norm", "guidance", "approximator", "noise_max")
        },
        users=sum(len(b[0]) for i, b in zip(range(args.batches), test)),
    )
    report(out, args.out)


if __name__ == "__main__":
    main()
