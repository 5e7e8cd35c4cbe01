"""GlobalDiff's training data: item-item similarity from the training interactions, per-user training
sequences, and the masked, position-reweighted Bernoulli targets (paper section 3.3)."""

import numpy as np
import scipy.sparse as sp
import torch
from recbole.data.interaction import Interaction

from recbole_diff.data.interactions import training_interactions

SIMILARITIES = ("sparse", "dense", "cluster")
SIMILARITY_WINDOWS = ("last", "all")


# ---- what the training split holds --------------------------------------------------------------------
def training_pairs(train_dataset, user_field, item_field, seq_field, len_field):
    """(users, items) of every training interaction (see :func:`training_interactions`); validation and test
    items never appear. The field names are the model's and must be the dataset's."""
    ds = train_dataset
    if (user_field, item_field) != (ds.uid_field, ds.iid_field):
        raise ValueError(
            f"training_pairs: fields {user_field}/{item_field} are not the dataset's {ds.uid_field}/{ds.iid_field}."
        )
    return training_interactions(ds)


def window_pairs(users, seqs, lens):
    """(users, items) of each user's windowed training sequence (``user_sequences``' output): the interactions
    the authors build the similarity from (``similarity_window: last``)."""
    keep = torch.arange(seqs.shape[1])[None] < lens[:, None]
    return users[:, None].expand_as(seqs)[keep].numpy(), seqs[keep].numpy()


def user_sequences(train_dataset, user_field, item_field, seq_field, len_field, max_len):
    """Each user's training sequence, its last ``max_len`` items (the history of the user's latest training
    row plus its target), right-padded: (users [N], seqs [N, max_len], lengths [N])."""
    inter = train_dataset.inter_feat
    users = inter[user_field]
    # the latest row of each user: rows are grouped by user in time order
    last = torch.ones(len(users), dtype=torch.bool)
    last[:-1] = users[1:] != users[:-1]
    seq, lens, target = inter[seq_field][last], inter[len_field][last], inter[item_field][last]
    full = torch.cat([seq, torch.zeros(len(seq), 1, dtype=seq.dtype)], dim=1)
    full[torch.arange(len(seq)), lens] = target
    lens = lens + 1
    # keep the last max_len items, shifted to start at position 0
    start = (lens - max_len).clamp(min=0)
    idx = start[:, None] + torch.arange(max_len)[None]
    out = full.gather(1, idx.clamp(max=full.shape[1] - 1))
    new_len = lens - start
    out[torch.arange(max_len)[None].expand_as(out) >= new_len[:, None]] = 0
    return users[last], out, new_len


class UserSequenceLoader:
    """Batches of user training sequences as RecBole Interactions, reshuffled every epoch, each sequence
    repeated ``mask_samples`` times (a fresh mask and Bernoulli draw each time)."""

    def __init__(self, dataset, users, seqs, lens, batch_size, mask_samples, user_field, seq_field, len_field):
        self._dataset = self.dataset = dataset  # RecBole's Trainer.fit reads train_data.dataset
        self.shuffle = True
        self.users, self.seqs, self.lens = users, seqs, lens
        self.batch_size, self.mask_samples = batch_size, mask_samples
        self.fields = (user_field, seq_field, len_field)

    def __len__(self):
        n = len(self.users) * self.mask_samples
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.users) * self.mask_samples) % len(self.users)
        user_field, seq_field, len_field = self.fields
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield Interaction({user_field: self.users[rows], seq_field: self.seqs[rows], len_field: self.lens[rows]})


# ---- item-item similarity -----------------------------------------------------------------------------
def _binary_matrix(users, items, n_users, n_items):
    data = np.ones(len(users), dtype=np.float32)
    matrix = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items))
    matrix.data[:] = 1.0  # repeated interactions count once
    return matrix


def _keep_topk(matrix, k):
    """Each row's k largest entries (CSR), the diagonal always kept."""
    matrix = matrix.tocsr()
    indptr, indices, data = [0], [], []
    for row in range(matrix.shape[0]):
        lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
        cols, vals = matrix.indices[lo:hi], matrix.data[lo:hi]
        if len(vals) > k:
            keep = np.argpartition(-vals, k - 1)[:k]
            if row in cols and row not in cols[keep]:
                keep = np.append(keep[:-1], np.nonzero(cols == row)[0][0])
            cols, vals = cols[keep], vals[keep]
        indices.append(cols)
        data.append(vals)
        indptr.append(indptr[-1] + len(cols))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=matrix.shape)


class ItemSimilarity:
    """Cosine similarity of item columns of the binary user-item training matrix, row-accessible on a device.

    * ``sparse``: A = D^-1/2 O^T O D^-1/2 as CSR arrays on the device, optionally each row's top-k only.
    * ``dense``: the same as a dense M x M tensor (refused when it would exceed ``dense_limit_gb``).
    * ``cluster``: K-means of the normalised item columns into K clusters; A[i, j] is approximated by the
      cosine of item i and the centroid of j's cluster (O(KM) memory), A[i, i] = 1.
    """

    def __init__(
        self,
        users,
        items,
        n_users,
        n_items,
        kind="sparse",
        topk=None,
        n_clusters=None,
        dense_limit_gb=4.0,
        seed=0,
        device="cpu",
    ):
        if kind not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got '{kind}'.")
        self.kind, self.n_items, self.device = kind, n_items, device
        if kind == "dense":
            need = n_items * n_items * 4 / 2**30
            if need > dense_limit_gb:
                raise MemoryError(
                    f"A dense item-item similarity for {n_items} items needs {need:.1f} GB, more than "
                    f"dense_memory_limit_gb = {dense_limit_gb}. Use similarity: sparse (with similarity_topk "
                    "to bound it) or similarity: cluster with n_clusters."
                )
        O = _binary_matrix(users, items, n_users, n_items)
        counts = np.asarray(O.sum(axis=0)).ravel()
        inv_norm = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0).astype(np.float32)
        if kind == "cluster":
            self._build_clusters(O, inv_norm, n_clusters, seed)
            return
        cooc = (O.T @ O).tocsr()
        scale = sp.diags(inv_norm)
        A = (scale @ cooc @ scale).tocsr().astype(np.float32)
        if topk:
            A = _keep_topk(A, int(topk))
        if kind == "dense":
            self.matrix = torch.from_numpy(A.toarray()).to(device)
        else:
            self._store_csr(A, device)

    def _build_clusters(self, O, inv_norm, n_clusters, seed):
        from sklearn.cluster import KMeans

        if not n_clusters or n_clusters < 2:
            raise ValueError("similarity: cluster needs n_clusters >= 2.")
        columns = (O @ sp.diags(inv_norm)).T.tocsr()  # unit-norm item vectors (zero for unseen items)
        k = min(int(n_clusters), columns.shape[0])
        km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(columns)
        centroids = km.cluster_centers_.astype(np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        self.item_to_cluster = torch.as_tensor(np.asarray(columns @ centroids.T), dtype=torch.float32).to(self.device)
        self.cluster_of = torch.as_tensor(km.labels_, dtype=torch.long).to(self.device)

    def rows(self, item_ids):
        """Dense rows A[item_ids, :] -> [B, M] on the device, without leaving it."""
        if self.kind == "dense":
            return self.matrix[item_ids]
        if self.kind == "cluster":
            out = self.item_to_cluster[item_ids][:, self.cluster_of]
            out[torch.arange(len(item_ids), device=out.device), item_ids] = 1.0
            return out
        # each row's entries through a fixed-width window of the CSR arrays: no data-dependent sizes, so no
        # host synchronisation; the padding slots add zeros
        start, end = self.crow[item_ids], self.crow[item_ids + 1]
        slots = torch.arange(self.max_row_nnz, device=start.device)
        pos = start[:, None] + slots[None]
        valid = pos < end[:, None]
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        out = torch.zeros(len(item_ids), self.n_items, device=start.device)
        return out.scatter_add_(1, self.col[pos], torch.where(valid, self.val[pos], 0.0))

    def _store_csr(self, A, device):
        A.sort_indices()
        self.crow = torch.as_tensor(A.indptr.astype(np.int64)).to(device)
        self.col = torch.as_tensor(A.indices.astype(np.int64)).to(device)
        self.val = torch.as_tensor(A.data.astype(np.float32)).to(device)
        if len(self.val) == 0:  # no training pair at all: one zero entry keeps the gather valid
            self.col, self.val = torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device)
        self.max_row_nnz = max(int(np.diff(A.indptr).max()), 1)

    def nbytes(self):
        if self.kind == "dense":
            return self.matrix.numel() * 4
        if self.kind == "cluster":
            return self.item_to_cluster.numel() * 4 + self.cluster_of.numel() * 8
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.val))


# ---- targets ------------------------------------------------------------------------------------------
def sample_mask_positions(lengths, causal, generator=None):
    """One position per sequence. Causal backbones need a non-empty prefix before it (positions 1..len-1);
    bidirectional ones may mask any real position."""
    low = 1 if causal else 0
    span = (lengths - low).clamp(min=1)
    u = torch.rand(lengths.shape, device=lengths.device, generator=generator)
    return (low + (u * span).long()).clamp(max=lengths - 1)


def reweighted_targets(similarity_rows, seq, lengths, positions, zeta, delta, position_offset):
    """q = A[s_i, :] with every in-sequence item s_j boosted to min((zeta / (|i - j| + offset) + delta) *
    A[s_i, s_j], 1); with offset 1 the masked item itself (j = i) gets min((zeta + delta) * 1, 1) = 1."""
    q = similarity_rows.clone()
    L = seq.shape[1]
    j = torch.arange(L, device=seq.device)[None]
    dist = (j - positions[:, None]).abs().float()
    boost = zeta / (dist + position_offset) + delta
    valid = j < lengths[:, None]
    if position_offset == 0:
        valid = valid & (dist > 0)  # the paper's |i - j| is undefined at i = j
    new = torch.clamp(boost * similarity_rows.gather(1, seq), max=1.0)
    new = torch.where(valid, new, similarity_rows.gather(1, seq))
    q.scatter_reduce_(1, seq, new, reduce="amax", include_self=False)
    q[:, 0] = 0.0  # the padding item is never a target
    return q.clamp_(0.0, 1.0)


def bernoulli_targets(q, generator=None):
    """x0 ~ Bernoulli(q), a fresh draw each call (the same item in two sequences gives different samples)."""
    return torch.bernoulli(q, generator=generator)
