"""RecBole's BERT4Rec with its cross-entropy loss computed at the real masked slots only.

RecBole's BERT4Rec masks ``int(mask_ratio * MAX_ITEM_LIST_LENGTH)`` slots per row (4 at length 20) and scores
every slot against every item, padding slots included, then zeroes the padding slots' losses. On short
sequences most slots are padding (Amazon Sports, length 20: 79% of them), and the ``[B, slots, n_items]``
logits are most of a training step. Here only the slots RecBole counts (``MASK_INDEX > 0``) are scored: the
same loss, the same gradients up to float rounding, the same random stream (masking happens in RecBole's data
transform). ``sparse_masked_loss: False`` trains with RecBole's own loss.
"""

import torch.nn.functional as F
from recbole.model.sequential_recommender.bert4rec import BERT4Rec as RecBoleBERT4Rec


class BERT4Rec(RecBoleBERT4Rec):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.sparse_masked_loss = config["sparse_masked_loss"]

    def calculate_loss(self, interaction):
        if self.loss_type != "CE" or not self.sparse_masked_loss:
            return super().calculate_loss(interaction)
        masked_index = interaction[self.MASK_INDEX]
        states = self.forward(interaction[self.MASK_ITEM_SEQ])  # [B, L, H]
        rows, slots = (masked_index > 0).nonzero(as_tuple=True)
        picked = states[rows, masked_index[rows, slots]]  # [N, H]: the state at each counted masked position
        logits = picked @ self.item_embedding.weight[: self.n_items].t() + self.output_bias
        return F.cross_entropy(logits, interaction[self.POS_ITEMS][rows, slots])
