"""TI-DiffRec: time-interval weights, RecBole's user-level loader, DiffRec's defaults."""

import numpy as np
import pytest
import torch
from helpers import SLICE, TINY
from recbole.data.dataloader import UserDataLoader

from recbole_diff import get_model
from recbole_diff.model.plugin.tidiffrec import interval_weights
from recbole_diff.quick_start import build_config, prepare_data


def test_interval_weights_are_min_max_scaled_per_user():
    users = np.array([1, 1, 1, 2, 2])
    items = np.array([5, 6, 7, 8, 9])
    times = np.array([30, 10, 20, 7, 7])
    u, i, w = interval_weights(users, items, times, 0.5, 1.0)
    got = {(a, b): c for a, b, c in zip(u.tolist(), i.tolist(), w.tolist())}
    assert got == pytest.approx({(1, 6): 0.5, (1, 7): 0.75, (1, 5): 1.0, (2, 8): 1.0, (2, 9): 1.0})


def test_a_repeated_item_keeps_its_last_occurrence():
    users = np.array([3, 3, 3, 3])
    items = np.array([4, 5, 4, 6])
    times = np.array([0, 10, 20, 40])
    u, i, w = interval_weights(users, items, times, 0.2, 1.0)
    got = dict(zip(i.tolist(), w.tolist()))
    assert len(i) == 3 and got[4] == pytest.approx(0.2 + 0.5 * 0.8) and got[6] == pytest.approx(1.0)


def test_position_weights_are_evenly_spaced_over_each_users_items_in_time_order():
    from recbole_diff.model.plugin.tidiffrec import within_user_positions

    users = np.array([1, 1, 1, 1, 2, 2])
    items = np.array([5, 6, 7, 8, 9, 10])
    times = np.array([30, 10, 20, 1000, 7, 8])  # a long gap: intervals would bunch user 1's first three
    u, i, w = interval_weights(users, items, within_user_positions(users, times), 0.4, 1.0)
    got = {(a, b): c for a, b, c in zip(u.tolist(), i.tolist(), w.tolist())}
    assert got == pytest.approx({(1, 6): 0.4, (1, 7): 0.6, (1, 5): 0.8, (1, 8): 1.0, (2, 9): 0.4, (2, 10): 1.0})


def build(**overrides):
    config = build_config("TIDiffRec", SLICE, config_dict=dict(TINY, dims_dnn=[32], **overrides), cmd_line=False)
    _, train, valid, test = prepare_data(config)
    return config, get_model("TIDiffRec")(config, train._dataset), train, valid, test


def test_gets_recboles_user_loader_and_diffrec_defaults():
    config, model, train, _, _ = build()
    assert isinstance(train, UserDataLoader)
    assert config["model"] == "TIDiffRec"
    assert config["history_num_per_term"] == 10 and config["mlp_act_func"] == "tanh"  # DiffRec.yaml
    assert config["steps"] == 10 and config["w_min"] == 0.5  # ours on top


def test_user_vectors_hold_training_items_with_their_weights_only():
    config, model, train, valid, test = build()
    ds = train._dataset
    inter = ds.inter_feat
    user = int(inter["user_id"][0])
    rows = inter["user_id"] == user
    times = inter["timestamp"][rows].numpy()
    items = inter["item_id"][rows].numpy()
    vector = model.get_rating_matrix(torch.tensor([user]))[0]
    assert set(torch.nonzero(vector).flatten().tolist()) == set(items.tolist())
    latest = items[times.argmax()]
    assert vector[latest].item() == pytest.approx(1.0)
    assert vector[vector > 0].min().item() == pytest.approx(0.5)
    for loader in (valid, test):
        held = loader._dataset.inter_feat
        for u, i in zip(held["user_id"].tolist(), held["item_id"].tolist()):
            if u == user:
                assert vector[i].item() == 0 or i in items


def test_trains_and_ranks_all_items():
    _, model, train, _, test = build()
    batch = next(iter(train))
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    inter = next(iter(test))[0]
    with torch.no_grad():
        assert model.full_sort_predict(inter).shape == (len(inter), model.n_items)


def test_sampled_predict_reads_one_reverse_run_per_user():
    from recbole.data.interaction import Interaction

    _, model, _, _, _ = build(mask_history=True)
    model.eval()
    users = torch.tensor([3, 3, 3, 7, 7])
    items = torch.tensor([1, 5, 9, 2, 4])
    with torch.no_grad():
        full = model.full_sort_predict(Interaction({"user_id": users}))
        got = model.predict(Interaction({"user_id": users, "item_id": items}))
    # the same numbers up to float rounding: the reverse run of 2 unique users and of 5 rows are matrix products
    # of other shapes, which this CPU's kernels may sum in another order
    torch.testing.assert_close(got, full[torch.arange(5), items], rtol=1e-5, atol=1e-7)
    history = model.history_item_id[3][model.history_item_value[3] > 0]
    assert torch.isinf(full[0, history]).all()  # mask_history ranks training items last


def test_position_weighting_and_bad_choices():
    _, model, _, _, _ = build(weighting="position")
    assert model.time_aware
    with pytest.raises(ValueError, match="weighting"):
        build(weighting="hourly")
    with pytest.raises(ValueError, match="w_min <= w_max"):
        build(w_min=0.9, w_max=0.2)


def test_runs_on_its_own_like_any_recbole_model_and_beats_chance(tmp_path):
    from recbole_diff.quick_start import load_data_and_model, run_recbole_diff

    result = run_recbole_diff(
        "TIDiffRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(
            TINY, dims_dnn=[64], epochs=10, learning_rate=1e-3, train_batch_size=16, checkpoint_dir=str(tmp_path)
        ),
    )
    _, _, dataset, *_ = load_data_and_model(result["saved_model_file"])
    # a random ranking's HR@10 is 10 / items (0.011 here); 10 epochs of 8 steps give about 0.03
    assert result["test_result"]["hit@10"] > 2 * 10 / dataset.item_num


def test_split_first_layer_gives_the_dense_layers_output_and_gradients():
    """SplitInputDNN == RecBole's DNN.forward (float32 summation order only: atol 1e-6 on outputs of size ~1,
    1e-5 on gradients), dense and with the sparse first-layer product."""
    from recbole.model.general_recommender.diffrec import DNN

    from recbole_diff.model.plugin.tidiffrec import SplitInputDNN

    _, model, _, _, _ = build()
    assert type(model.mlp) is SplitInputDNN
    user = torch.arange(1, 60)
    x0 = model.get_rating_matrix(user)
    assert (x0 != 0).float().mean() < 0.2  # the un-noised input is sparse
    t = torch.full((len(user),), 3)
    model.eval()
    with torch.no_grad():
        dense = DNN.forward(model.mlp, x0, t)
        assert torch.allclose(model.mlp(x0, t), dense, atol=1e-6, rtol=0)
        model.mlp.sparse_input = True
        assert torch.allclose(model.mlp(x0, t), dense, atol=1e-6, rtol=0)
        model.mlp.sparse_input = False
    model.train()
    x_t = x0 + 0.01 * torch.randn_like(x0)  # a noised, dense training input
    grads = []
    for forward in (DNN.forward, SplitInputDNN.forward):
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout mask
        out = forward(model.mlp, x_t, t)
        (out**2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.mlp.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4), k


def test_preferences_with_the_sparse_first_step_equal_recboles_reverse_run():
    from recbole.model.general_recommender.diffrec import DiffRec

    _, model, _, _, _ = build()
    model.eval()
    user = torch.arange(1, 60)
    with torch.no_grad():
        ours = model.preferences(user)
        reference = DiffRec.p_sample(model, model.get_rating_matrix(user))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def test_trainer_steps_with_a_fused_adamw():
    from recbole_diff import get_trainer

    config, model, _, _, _ = build()
    trainer = get_trainer(config["MODEL_TYPE"], "TIDiffRec")(config, model)
    assert type(trainer.optimizer).__name__.lower() == config["learner"].lower()
    assert trainer.optimizer.defaults["fused"] is True


def test_evaluation_scores_users_in_windows_and_forgets_them_when_weights_change(monkeypatch):
    from recbole.data.interaction import Interaction

    import recbole_diff.model.plugin.tidiffrec as tidiffrec

    monkeypatch.setattr(tidiffrec, "EVAL_WINDOW", 8)
    _, model, train, _, _ = build(mask_history=True)
    model.eval()
    calls = []
    preferences = model.preferences
    monkeypatch.setattr(model, "preferences", lambda u: calls.append(u.tolist()) or preferences(u))
    with torch.no_grad():
        reference = preferences(torch.arange(1, 20))
        got = [model.full_sort_predict(Interaction({"user_id": torch.tensor(b)})) for b in ([1, 2], [3, 5], [9, 12])]
    assert calls == [list(range(1, 9)), list(range(9, 17))]  # two windows serve three batches
    expected = reference.masked_fill(model.history_mask(torch.arange(1, 20)), float("-inf"))
    for rows, scores in zip(([0, 1], [2, 4], [8, 11]), got):
        torch.testing.assert_close(scores, expected[rows], rtol=1e-4, atol=1e-5)
    # a training step changes the weights: the window is computed again
    model.train()
    loss = model.calculate_loss(next(iter(train)))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=10.0).step()
    model.eval()
    with torch.no_grad():
        after = model.full_sort_predict(Interaction({"user_id": torch.tensor([9, 12])}))
        fresh = preferences(torch.tensor([9, 12])).masked_fill(model.history_mask(torch.tensor([9, 12])), float("-inf"))
    assert calls[-1][0] == 9 and not torch.allclose(after, got[2])
    torch.testing.assert_close(after, fresh, rtol=1e-4, atol=1e-5)  # other batch shapes: other summation order
    # loading other weights while in evaluation also drops the window
    calls.clear()
    state = {k: v + 0.1 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        model.full_sort_predict(Interaction({"user_id": torch.tensor([9])}))
    assert calls == [list(range(9, 17))]


def test_sampled_validation_is_the_same_with_windows(tmp_path, monkeypatch):
    """RecBole's sampled (uni100) evaluation of a TI-DiffRec gives the same metrics scored in windows of users
    as scored a batch at a time (a window of one user covers just the batch's users)."""
    import recbole_diff.model.plugin.tidiffrec as tidiffrec
    from recbole_diff import get_trainer

    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config, model, train, valid, _ = build(
        mask_history=True, eval_args=uni100, eval_batch_size=404, checkpoint_dir=str(tmp_path)
    )
    trainer = get_trainer(config["MODEL_TYPE"], "TIDiffRec")(config, model)
    preferences, calls = model.preferences, []
    monkeypatch.setattr(model, "preferences", lambda u: calls.append(len(u)) or preferences(u))
    results, passes = {}, {}
    for window in (1, 256):
        monkeypatch.setattr(tidiffrec, "EVAL_WINDOW", window)
        calls.clear()
        results[window] = trainer.evaluate(valid, load_best_model=False)
        passes[window] = len(calls)
    assert results[1] == results[256] and results[1]["ndcg@10"] > 0
    assert passes[1] >= len(valid) and passes[256] == -(-model.n_users // 256) < passes[1] / 10
