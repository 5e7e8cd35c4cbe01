"""DiffuRec / DiffuRecSys inference over a strided subset of the reverse steps (the shared core's respaced
process); bf16 autocast."""

import pytest
import torch
from test_diffurec import build, first_batch

from recbole_diff.diffusion import GaussianDiffusion


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
def test_a_strided_loop_over_all_steps_equals_the_full_loop(name):
    _, model, _, test = build(name, sample_steps=None)  # the full loop (the default is one step)
    model.eval()
    users = first_batch(test)
    with torch.no_grad():
        full = model.full_sort_predict(users)
        model.sample_steps = model.diffusion.num_steps
        strided = model.full_sort_predict(users)
        model.sample_steps = 4
        fewer = model.full_sort_predict(users)
    assert torch.equal(full, strided)
    assert not torch.equal(full, fewer)


def test_the_core_runs_the_same_loop_for_all_steps_given_as_a_count_or_a_list():
    diffusion = GaussianDiffusion("trunc_lin", 32, parameterization="x0", variance="fixed_large")
    weight = torch.randn(8, 8)

    def model_fn(x_t, t):
        return torch.tanh(x_t @ weight) + 0.01 * t[:, None]

    x_T = torch.randn(5, 8)
    runs = [
        diffusion.sample(model_fn, x_T=x_T, steps=steps, generator=torch.Generator().manual_seed(0))
        for steps in (None, 32, list(range(31, -1, -1)))
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("steps,sampler", [(4, "ancestral"), (3, "ddim"), (1, "ancestral")])
def test_sample_steps_sets_the_denoiser_calls(steps, sampler):
    _, model, _, test = build(sample_steps=steps, sampler=sampler, length_buckets=1)
    model.eval()
    calls = []
    original = model.denoise
    model.denoise = lambda *a, **k: calls.append(a[4]) or original(*a, **k)
    with torch.no_grad():
        model.full_sort_predict(first_batch(test))
    assert len(calls) == steps and int(calls[-1][0]) == 0  # the last step always lands on x0


def test_ddim_is_deterministic_given_x_T():
    _, model, _, test = build(sampler="ddim", sample_steps=8, lambda_std=0.0)
    model.eval()
    users = first_batch(test)
    with torch.no_grad():
        a = model.full_sort_predict(users)
        b = model.full_sort_predict(users)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "key,value,match",
    [("sample_steps", 0, "sample_steps"), ("sample_steps", 33, "sample_steps"), ("sampler", "euler", "sampler")],
)
def test_bad_step_settings_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        build(**{key: value})


# ---- mixed_precision: bf16 ------------------------------------------------------------------------------------
def fit(name, tmp_path, **overrides):
    from recbole_diff import get_trainer

    config, model, train, test = build(name, checkpoint_dir=str(tmp_path), epochs=3, **overrides)
    trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    dtypes = []
    model.blocks[0].ffn[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    trainer.fit(train, saved=False)
    trained = list(dtypes)
    result = trainer.evaluate(test, load_best_model=False)
    return result, set(trained), set(dtypes[len(trained) :])


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
def test_bf16_autocast_keeps_metrics_within_tolerance_of_fp32(name, tmp_path):
    """Trained and evaluated under CPU bf16 autocast from the same initial weights: test NDCG@10 and HR@10
    within 0.02 (absolute; the slice's 120 users give steps of 1/120 = 0.008 in HR) of the fp32 run's."""
    fp32, train32, eval32 = fit(name, tmp_path / "fp32")
    bf16, train16, eval16 = fit(name, tmp_path / "bf16", mixed_precision="bf16", mixed_precision_on_cpu=True)
    assert train32 == eval32 == {torch.float32}
    assert train16 == eval16 == {torch.bfloat16}  # autocast reached the training and the evaluation steps
    for metric in ("ndcg@10", "hit@10"):
        assert abs(bf16[metric] - fp32[metric]) <= 0.02, (metric, fp32[metric], bf16[metric])


def test_bf16_is_off_on_the_cpu_unless_asked(tmp_path):
    _, train16, eval16 = fit("DiffuRec", tmp_path, mixed_precision="bf16")
    assert train16 == eval16 == {torch.float32}


def test_bf16_scores_are_ranked_in_fp32():
    from recbole_diff.device import mixed_precision

    config, model, _, test = build(mixed_precision="bf16", mixed_precision_on_cpu=True)
    model.eval()
    with torch.no_grad(), mixed_precision(config, "cpu"):
        scores = model.full_sort_predict(first_batch(test))
    assert scores.dtype == torch.float32


def test_an_unknown_mixed_precision_is_refused_before_training(tmp_path):
    from recbole_diff import get_trainer

    config, model, _, _ = build(checkpoint_dir=str(tmp_path), mixed_precision="fp16")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        get_trainer(config["MODEL_TYPE"], "DiffuRec")(config, model)
