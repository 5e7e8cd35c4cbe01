"""Sampled evaluation (uni100, pop100) batches built a batch at a time.

RecBole's ``NegSampleEvalDataLoader`` builds each batch user by user: it slices the user's rows out of the
dataset, draws the user's negatives, repeats the rows once per candidate and concatenates the users'
interactions. On sports (35.6k users) that takes 15-24 s a validation (idle or busy cores), about as long as a
GRU4Rec training epoch, nearly all of it in building small interactions, not in drawing.

:class:`CandidateEvalDataLoader` gives the same batches (rows, candidates, labels, indices) from one gather and
one join per batch, 6x faster on sports (``benchmarks/sampled_eval.py --loader``). The candidates stay RecBole's:
its sampler's ``sampling`` draws them user by user, with the same calls in the same order and the same redraws,
so the numpy random stream, and every later draw from it, is unchanged. Batches it does not cover (a transform
other than ``Equal``, such as BERT4Rec's masking; another sampler; dynamic negatives) are RecBole's own.
"""

import numpy as np
import torch
from recbole.data.dataloader import NegSampleEvalDataLoader
from recbole.data.interaction import Interaction
from recbole.data.transform import Equal
from recbole.sampler import RepeatableSampler, Sampler


class CandidateEvalDataLoader(NegSampleEvalDataLoader):
    """RecBole's ``NegSampleEvalDataLoader`` with each batch built at once: the same batches, faster."""

    def _at_once(self):
        args = self.neg_sample_args
        return (
            args["distribution"] != "none"
            and args["sample_num"] != "none"
            and not args.get("dynamic", False)
            and type(self.transform) is Equal
            and type(self._sampler) in (Sampler, RepeatableSampler)
        )

    def collate_fn(self, index):
        if not self._at_once():
            return super().collate_fn(index)
        users = self.uid_list[np.array(index)]
        counts = self.uid2items_num[users]
        starts = np.fromiter((self.uid2index[u].start for u in users), dtype=np.int64, count=len(users))
        # every user's items in the dataset, users in batch order (RecBole slices them user by user)
        offsets = np.cumsum(counts) - counts
        iid = self.iid_field
        positive_i = self._dataset.inter_feat[iid][np.repeat(starts - offsets, counts) + np.arange(counts.sum())]
        own = positive_i.numpy()
        negatives = [self._draw(int(u), own[o : o + n]) for u, o, n in zip(users, offsets, counts)]
        # a user's block: its n rows, then the same n rows once per negative (RecBole's ``repeat``), the
        # negatives in place of the item
        sizes = counts * self.times
        user_of = np.repeat(np.arange(len(users)), sizes)
        place = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        data = _gather(self._dataset.inter_feat, starts[user_of] + place % counts[user_of])
        is_negative = place >= counts[user_of]
        items = data[iid].numpy().copy()
        items[is_negative] = np.concatenate(negatives)
        data.interaction[iid] = torch.from_numpy(items)
        data = self._dataset.join(data)
        data.update(Interaction({self.label_field: torch.from_numpy(~is_negative).to(torch.get_default_dtype())}))
        row_idx = torch.from_numpy(user_of)
        positive_u = torch.from_numpy(np.repeat(np.arange(len(users)), counts))
        return data, row_idx, positive_u, positive_i

    def _draw(self, user, items):
        """The negatives of a user with positive ``items``, exactly as RecBole's ``sample_by_user_ids`` draws them:
        all at once, then the draws that hit a used item again, until none does. Draw ``i`` belongs to row
        ``i % len(items)``; its used items are the row's own item (``RepeatableSampler``, sequential data) or
        the user's (``Sampler``)."""
        sampler = self._sampler
        values = sampler.sampling(len(items) * self.neg_sample_num)
        if type(sampler) is RepeatableSampler:
            own = np.tile(items, self.neg_sample_num)
            redraw = np.flatnonzero(values == own)
            while len(redraw):
                values[redraw] = fresh = sampler.sampling(len(redraw))
                redraw = redraw[fresh == own[redraw]]
            return values
        used = sampler.used_ids[user]
        redraw = [i for i, v in enumerate(values.tolist()) if v in used]
        while redraw:
            values[redraw] = fresh = sampler.sampling(len(redraw))
            redraw = [i for i, v in zip(redraw, fresh.tolist()) if v in used]
        return values


def _gather(interaction, rows):
    """``interaction[rows]`` with a tensor index (RecBole's ``__getitem__`` goes through a Python list)."""
    rows = torch.from_numpy(rows)
    return Interaction({k: v[rows] for k, v in interaction.interaction.items()})


def fast_eval_loaders(config, *loaders):
    """The loaders, each RecBole ``NegSampleEvalDataLoader`` among them replaced by a
    :class:`CandidateEvalDataLoader` over the same dataset and sampler (with ``fast_sampled_eval``)."""
    if not config["fast_sampled_eval"]:
        return loaders
    return tuple(
        CandidateEvalDataLoader(config, loader._dataset, loader._sampler, shuffle=False)
        if type(loader) is NegSampleEvalDataLoader
        else loader
        for loader in loaders
    )
