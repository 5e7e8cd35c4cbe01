"""What a training split holds, for general and sequential RecBole datasets alike."""

import numpy as np


def training_interactions(train_dataset, with_time=False):
    """(users, items[, times]) of every interaction of ``train_dataset``.

    A general dataset's rows are the interactions. A sequential training split holds (history, target)
    rows over each user's training part: the targets plus each user's first item (the history of the
    length-1 row) are exactly that part, so validation and test items never appear. ``times`` is None when
    the dataset has no time field (and ``with_time`` is asked).
    """
    ds = train_dataset
    inter = ds.inter_feat
    users, items = inter[ds.uid_field].numpy(), inter[ds.iid_field].numpy()
    time_field = ds.time_field if ds.time_field in inter.columns else None
    times = inter[time_field].numpy() if time_field else None
    seq_field = ds.iid_field + ds.config["LIST_SUFFIX"]
    len_field = ds.config["ITEM_LIST_LENGTH_FIELD"]
    if seq_field in inter.columns and len_field in inter.columns:
        # First items go first: RecBole keeps times as float32 (epoch seconds lose ~1 minute), so a stable sort
        # by time must fall back to this order, which is each user's true order.
        first = inter[len_field].numpy() == 1
        users = np.concatenate([users[first], users])
        items = np.concatenate([inter[seq_field][:, 0].numpy()[first], items])
        if times is not None:
            time_list = time_field + ds.config["LIST_SUFFIX"]
            if time_list not in inter.columns:
                times = None
            else:
                times = np.concatenate([inter[time_list][:, 0].numpy()[first], times])
    if with_time:
        return users, items, times
    return users, items
